//! Session mode (`docs/sessions.md`) over the in-memory broker, with scripted jobs on a paused
//! clock: order per session, sessions side by side, retry in place, dead letters, lock loss,
//! idle release.

use std::sync::Arc;
use std::time::Duration;

use hybrid_worker::broker::memory::{Event, MemoryBroker};
use hybrid_worker::engine::Engine;
use hybrid_worker::engine::sessions::SessionOptions;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

fn broker(lock_s: u64) -> Arc<MemoryBroker> {
    MemoryBroker::shared(JOBS, Duration::from_secs(lock_s), 10)
}

fn start_sessions(
    b: Arc<MemoryBroker>,
    exec: Arc<ScriptedExecutor>,
    concurrency: usize,
) -> Running {
    let engine = Engine::new(b, exec, options(concurrency)).with_sessions(SessionOptions {
        idle_timeout: Duration::from_secs(5),
    });
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move { engine.run(token).await });
    Running { shutdown, task }
}

/// Job `id` of session `key`.
fn keyed(b: &MemoryBroker, key: &str, id: &str, input: Value) {
    let mut msg = job_message(id, &json!({"worker": "scripted", "input": input}));
    msg.session_id = Some(key.into());
    b.push(msg);
}

/// The job ids in the order they started (a retry repeats its id).
fn started_ids(exec: &ScriptedExecutor, prefix: &str) -> Vec<String> {
    exec.started()
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| id.starts_with(prefix))
        .collect()
}

/// The MessageIds of every message sent, in order.
fn sent_ids(b: &MemoryBroker) -> Vec<String> {
    b.events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Sent { message_id, .. } => message_id,
            _ => None,
        })
        .collect()
}

async fn until_replied(b: &MemoryBroker, count: usize) {
    wait_for(Duration::from_secs(600), "every reply", || {
        b.messages(RESULTS).len() >= count && b.locked_count() == 0
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn each_session_runs_in_order_while_a_slow_one_holds_none_back() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    for i in 0..5 {
        for key in ["a", "b", "c"] {
            // c's first job is slow: a and b must finish all of theirs meanwhile.
            let ms = if key == "c" && i == 0 { 60_000 } else { 100 };
            keyed(&b, key, &format!("{key}{i}"), json!({"ms": ms}));
        }
    }
    let run = start_sessions(b.clone(), exec.clone(), 3);
    until_replied(&b, 15).await;
    run.stop().await;
    for key in ["a", "b", "c"] {
        let expected: Vec<String> = (0..5).map(|i| format!("{key}{i}")).collect();
        assert_eq!(started_ids(&exec, key), expected, "session {key}");
    }
    let all = started_ids(&exec, "");
    let c1 = all.iter().position(|id| id == "c1").expect("c1 ran");
    for id in ["a4", "b4"] {
        let at = all.iter().position(|x| x == id).expect("ran");
        assert!(at < c1, "{id} waited for the slow session: {all:?}");
    }
    assert!(b.dead_letters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_retryable_failure_is_retried_in_place_before_the_sessions_next_job() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    keyed(
        &b,
        "k",
        "k1",
        json!({"result": "fail", "ok_from_attempt": 2}),
    );
    keyed(&b, "k", "k2", json!({}));
    let run = start_sessions(b.clone(), exec.clone(), 2);
    until_replied(&b, 2).await;
    run.stop().await;
    assert_eq!(
        exec.started(),
        [("k1".into(), 1), ("k1".into(), 2), ("k2".into(), 1)]
    );
    let events = b.events();
    assert!(
        !events.iter().any(|e| matches!(e, Event::Scheduled { .. })),
        "no scheduled copy: {events:?}"
    );
    let replies = replies(&b, RESULTS);
    assert_eq!(replies["k1"].1["attempt"], 2);
    assert_eq!(replies["k1"].1["status"], "succeeded");
    // The retry's backoff (10-20 s with the scripted policy) was waited out in place.
    assert!(b.messages(JOBS).is_empty());
}

#[tokio::test(start_paused = true)]
async fn retries_in_place_give_up_after_max_attempts_and_the_session_goes_on() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    keyed(&b, "k", "k1", json!({"result": "fail"}));
    keyed(&b, "k", "k2", json!({"result": "invalid"}));
    keyed(&b, "k", "k3", json!({}));
    let run = start_sessions(b.clone(), exec.clone(), 1);
    until_replied(&b, 3).await;
    run.stop().await;
    assert_eq!(started_ids(&exec, "k"), ["k1", "k1", "k1", "k2", "k3"]);
    let reasons: Vec<String> = b.dead_letters().into_iter().map(|d| d.reason).collect();
    assert_eq!(reasons, ["MaxAttemptsExceeded", "InvalidInput"]);
    assert_eq!(replies(&b, RESULTS)["k3"].1["status"], "succeeded");
}

#[tokio::test(start_paused = true)]
async fn the_session_lock_is_renewed_for_a_job_longer_than_the_lock() {
    let b = broker(10);
    let exec = Arc::new(ScriptedExecutor::default());
    keyed(&b, "k", "k1", json!({"ms": 45_000}));
    keyed(&b, "k", "k2", json!({}));
    let run = start_sessions(b.clone(), exec.clone(), 1);
    until_replied(&b, 2).await;
    run.stop().await;
    assert_eq!(started_ids(&exec, "k"), ["k1", "k2"], "run once each");
    assert!(b.dead_letters().is_empty());
}

/// k1 then k2 on one key; `lose` takes the session lock from the holder while k1 runs. The
/// holder stops k1 and sends nothing; the next holder runs k1 again, then k2.
async fn lose_the_lock_while_k1_runs(lock_s: u64, k1_ms: u64, lose: impl FnOnce(&MemoryBroker)) {
    let b = broker(lock_s);
    let exec = Arc::new(ScriptedExecutor::default());
    keyed(&b, "k", "k1", json!({"ms": k1_ms}));
    keyed(&b, "k", "k2", json!({}));
    let run = start_sessions(b.clone(), exec.clone(), 1);
    wait_for(Duration::from_secs(10), "k1 started", || {
        !exec.started().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    lose(&b);
    until_replied(&b, 2).await;
    run.stop().await;
    assert_eq!(exec.stopped.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(started_ids(&exec, "k"), ["k1", "k1", "k2"]);
    assert_eq!(
        sent_ids(&b),
        ["k1:result", "k2:result"],
        "nothing sent by the holder that lost the lock"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_session_lock_stops_the_job_and_the_next_holder_runs_it_again_in_order() {
    lose_the_lock_while_k1_runs(30, 60_000, |b| b.revoke_session("k")).await;
}

/// The broker stops answering renewals: the lock runs out 4 s after it was taken, while k1
/// still has 2 s to go.
#[tokio::test(start_paused = true)]
async fn a_session_lock_that_runs_out_unrenewed_stops_the_job_before_it_replies() {
    lose_the_lock_while_k1_runs(4, 6_000, MemoryBroker::stall_session_renewals).await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_is_let_go_so_another_gets_its_slot() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    keyed(&b, "a", "a1", json!({}));
    let run = start_sessions(b.clone(), exec.clone(), 1);
    until_replied(&b, 1).await;
    keyed(&b, "b", "b1", json!({}));
    // One slot, held by the idle session a until the idle timeout (5 s) lets it go.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(started_ids(&exec, ""), ["a1"]);
    until_replied(&b, 2).await;
    run.stop().await;
    assert_eq!(started_ids(&exec, ""), ["a1", "b1"]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_the_running_job_then_releases_the_session() {
    use hybrid_worker::broker::Broker;
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    keyed(&b, "k", "k1", json!({"ms": 5_000}));
    keyed(&b, "k", "k2", json!({}));
    let run = start_sessions(b.clone(), exec.clone(), 2);
    wait_for(Duration::from_secs(10), "k1 started", || {
        !exec.started().is_empty()
    })
    .await;
    run.stop().await;
    assert_eq!(
        started_ids(&exec, "k"),
        ["k1"],
        "nothing new after the stop signal"
    );
    assert!(
        replies(&b, RESULTS).contains_key("k1"),
        "the running job finished"
    );
    assert_eq!(b.locked_count(), 0);
    let session = b
        .accept_session(Duration::ZERO)
        .await
        .expect("accept")
        .expect("the session was released, not left to expire");
    assert_eq!(session.session_id(), "k");
}
