//! The engine over the in-memory broker, with scripted jobs on a paused clock: every rule of
//! `docs/contracts.md` about settlement, retries, locks, credit and shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hybrid_worker::broker::memory::{Event, MemoryBroker};
use serde_json::json;

use crate::helpers::*;

fn broker(lock_s: u64) -> Arc<MemoryBroker> {
    Arc::new(MemoryBroker::new(JOBS, Duration::from_secs(lock_s), 10))
}

#[tokio::test(start_paused = true)]
async fn success_sends_the_reply_then_completes() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    b.push(job_message(
        "j1",
        &json!({"worker": "scripted", "input": {"ms": 50}}),
    ));
    let run = start(b.clone(), exec.clone(), options(4));
    wait_for(Duration::from_secs(60), "a reply", || {
        !b.messages(RESULTS).is_empty()
    })
    .await;
    wait_for(Duration::from_secs(60), "completion", || {
        b.locked_count() == 0
    })
    .await;
    run.stop().await;

    let replies = replies(&b, RESULTS);
    let (msg, body) = &replies["j1"];
    assert_eq!(msg.message_id.as_deref(), Some("j1:result"));
    assert_eq!(msg.session_id.as_deref(), Some("session-j1"));
    assert_eq!(msg.application["status"], "succeeded");
    assert_eq!(msg.application["worker"], "scripted");
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["output"], json!({"done": "j1"}));
    assert_eq!(body["error"], serde_json::Value::Null);
    assert_eq!(body["attempt"], 1);
    let events = b.events();
    let sent = events.iter().position(|e| matches!(e, Event::Sent { .. }));
    let completed = events.iter().position(|e| matches!(e, Event::Completed(_)));
    assert!(sent < completed && completed.is_some(), "{events:?}");
    assert!(b.dead_letters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn retryable_failures_are_retried_with_growing_delays_then_dead_lettered() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    b.push(job_message(
        "j2",
        &json!({"worker": "scripted", "input": {"result": "fail"}}),
    ));
    let run = start(b.clone(), exec.clone(), options(4));
    wait_for(Duration::from_secs(3600), "a dead letter", || {
        !b.dead_letters().is_empty()
    })
    .await;
    wait_for(Duration::from_secs(60), "the reply", || {
        !b.messages(RESULTS).is_empty()
    })
    .await;
    run.stop().await;

    assert_eq!(
        exec.started(),
        vec![("j2".into(), 1), ("j2".into(), 2), ("j2".into(), 3)]
    );
    let delays: Vec<Duration> = b
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Scheduled {
                queue,
                message_id,
                delay,
            } => {
                assert_eq!(queue, JOBS);
                assert!(message_id.is_some_and(|id| id.starts_with("j2:attempt-")));
                Some(delay)
            }
            _ => None,
        })
        .collect();
    assert_eq!(delays.len(), 2, "two retries for max_attempts = 3");
    assert!(
        delays[0] >= Duration::from_secs(10) && delays[0] < Duration::from_secs(20),
        "{delays:?}"
    );
    assert!(
        delays[1] >= Duration::from_secs(20) && delays[1] < Duration::from_secs(40),
        "{delays:?}"
    );

    let dead = b.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "MaxAttemptsExceeded");
    assert!(
        !dead[0].description.contains("secret payload"),
        "{}",
        dead[0].description
    );
    assert!(dead[0].description.contains("HandlerError"));
    let replies = replies(&b, RESULTS);
    let (msg, body) = &replies["j2"];
    assert_eq!(msg.application["status"], "failed");
    assert_eq!(body["error"]["kind"], "MaxAttemptsExceeded");
    assert_eq!(body["error"]["retryable"], false);
    assert_eq!(body["attempt"], 3);
    assert_eq!(
        b.messages(RESULTS).len(),
        1,
        "exactly one reply for the whole job"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_that_succeeds_answers_once() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    b.push(job_message(
        "j3",
        &json!({"worker": "scripted", "input": {"result": "fail", "ok_from_attempt": 2}}),
    ));
    let run = start(b.clone(), exec.clone(), options(2));
    wait_for(Duration::from_secs(3600), "a reply", || {
        !b.messages(RESULTS).is_empty()
    })
    .await;
    run.stop().await;
    let replies = replies(&b, RESULTS);
    assert_eq!(replies["j3"].1["status"], "succeeded");
    assert_eq!(replies["j3"].1["attempt"], 2);
    assert!(b.dead_letters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn permanent_failures_reply_and_dead_letter_at_once() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    b.push(job_message(
        "j4",
        &json!({"worker": "scripted", "input": {"result": "invalid"}}),
    ));
    let run = start(b.clone(), exec.clone(), options(4));
    wait_for(Duration::from_secs(60), "a dead letter", || {
        !b.dead_letters().is_empty()
    })
    .await;
    run.stop().await;
    assert_eq!(exec.started().len(), 1);
    assert!(
        !b.events()
            .iter()
            .any(|e| matches!(e, Event::Scheduled { .. }))
    );
    let dead = b.dead_letters();
    assert_eq!(dead[0].reason, "InvalidInput");
    let replies = replies(&b, RESULTS);
    assert_eq!(replies["j4"].1["error"]["kind"], "InvalidInput");
    assert_eq!(replies["j4"].1["error"]["message"], "field x is wrong");
    let events = b.events();
    let sent = events.iter().position(|e| matches!(e, Event::Sent { .. }));
    let dead_at = events
        .iter()
        .position(|e| matches!(e, Event::DeadLettered { .. }));
    assert!(
        sent < dead_at,
        "the reply goes before the dead letter: {events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn malformed_bodies_are_dead_lettered_with_their_kind() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("m-notjson", b"this is not json".to_vec(), "MalformedJob"),
        ("m-array", b"[1,2,3]".to_vec(), "MalformedJob"),
        ("m-noworker", br#"{"input": 1}"#.to_vec(), "MalformedJob"),
        ("m-types", br#"{"worker": 42}"#.to_vec(), "MalformedJob"),
        ("m-binary", vec![0xff, 0x00, 0xfe], "MalformedJob"),
        (
            "m-oversize",
            format!(
                r#"{{"worker":"scripted","input":"{}"}}"#,
                "x".repeat(70 * 1024)
            )
            .into_bytes(),
            "MalformedJob",
        ),
        (
            "m-unknown",
            br#"{"worker": "nope"}"#.to_vec(),
            "UnknownWorker",
        ),
        (
            "m-denied",
            br#"{"worker": "denied"}"#.to_vec(),
            "PolicyDenied",
        ),
    ];
    for (id, body, _) in &cases {
        let mut msg = job_message(id, &json!(null));
        msg.body = body.clone();
        b.push(msg);
    }
    let run = start(b.clone(), exec.clone(), options(3));
    wait_for(Duration::from_secs(60), "all dead letters", || {
        b.dead_letters().len() == cases.len()
    })
    .await;
    wait_for(Duration::from_secs(60), "all replies", || {
        b.messages(RESULTS).len() == cases.len()
    })
    .await;
    run.stop().await;
    assert!(
        exec.started().is_empty(),
        "no malformed job reaches a worker"
    );
    let replies = replies(&b, RESULTS);
    for (id, _, kind) in &cases {
        let (msg, body) = &replies[*id];
        assert_eq!(body["error"]["kind"], *kind, "{id}");
        assert_eq!(msg.application["status"], "failed");
        assert_eq!(
            msg.session_id.as_deref(),
            Some(format!("session-{id}").as_str())
        );
    }
    for dead in b.dead_letters() {
        assert!(!dead.description.contains('\n') && dead.description.len() <= 256);
        assert!(
            !dead.description.contains("xxxxxxxx"),
            "no payload in descriptions"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn locks_are_renewed_for_jobs_longer_than_the_lock() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    b.push(job_message(
        "long",
        &json!({"worker": "scripted", "input": {"ms": 200_000}}),
    ));
    let run = start(b.clone(), exec.clone(), options(1));
    wait_for(Duration::from_secs(600), "a reply", || {
        !b.messages(RESULTS).is_empty()
    })
    .await;
    run.stop().await;
    let renewals = b
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Renewed(_)))
        .count();
    assert!(renewals >= 200 / 30, "renewed {renewals} times");
    assert_eq!(exec.started().len(), 1, "never redelivered while running");
    assert!(b.events().iter().any(|e| matches!(e, Event::Completed(_))));
}

#[tokio::test(start_paused = true)]
async fn a_lost_lock_stops_the_job_and_settles_nothing() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    // The first delivery runs long; when its lock is taken away it must stop without any
    // settlement; the redelivery (same body) is then answered once.
    b.push(job_message(
        "lost",
        &json!({"worker": "scripted", "input": {"ms": 100_000}}),
    ));
    let run = start(b.clone(), exec.clone(), options(1));
    wait_for(Duration::from_secs(60), "the job to start", || {
        exec.started().len() == 1
    })
    .await;
    let token = b.locked_tokens()[0];
    b.revoke_lock(token);
    wait_for(Duration::from_secs(60), "the job to be stopped", || {
        exec.stopped.load(Ordering::SeqCst) == 1
    })
    .await;
    let events = b.events();
    assert!(
        !events.iter().any(|e| matches!(
            e,
            Event::Completed(_)
                | Event::Abandoned(_)
                | Event::DeadLettered { .. }
                | Event::Sent { .. }
        )),
        "nothing settled after a lost lock: {events:?}"
    );
    wait_for(Duration::from_secs(600), "the redelivery's reply", || {
        !b.messages(RESULTS).is_empty()
    })
    .await;
    run.stop().await;
    assert_eq!(exec.started().len(), 2);
    assert_eq!(b.messages(RESULTS).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn credit_never_exceeds_free_slots() {
    let b = broker(60);
    let exec = Arc::new(ScriptedExecutor::default());
    for i in 0..12 {
        b.push(job_message(
            &format!("c{i}"),
            &json!({"worker": "scripted", "input": {"ms": 1000}}),
        ));
    }
    let run = start(b.clone(), exec.clone(), options(3));
    wait_for(Duration::from_secs(600), "all replies", || {
        b.messages(RESULTS).len() == 12
    })
    .await;
    run.stop().await;
    assert_eq!(
        b.peak_locked(),
        3,
        "at most `concurrency` messages locked at once"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_running_jobs_then_abandons_what_is_left() {
    let b = broker(600);
    let exec = Arc::new(ScriptedExecutor::default());
    b.push(job_message(
        "short",
        &json!({"worker": "scripted", "input": {"ms": 5_000}}),
    ));
    b.push(job_message(
        "long",
        &json!({"worker": "scripted", "input": {"ms": 500_000}}),
    ));
    let mut opts = options(2);
    opts.drain_timeout = Duration::from_secs(60);
    let run = start(b.clone(), exec.clone(), opts);
    wait_for(Duration::from_secs(60), "both jobs to start", || {
        exec.started().len() == 2
    })
    .await;
    let stopping = tokio::time::Instant::now();
    run.stop().await;
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_secs(60) && took < Duration::from_secs(70),
        "drained for {took:?}"
    );
    let replies = replies(&b, RESULTS);
    assert_eq!(replies.len(), 1, "the short job finished and was answered");
    assert!(replies.contains_key("short"));
    assert_eq!(exec.stopped.load(Ordering::SeqCst), 1);
    assert!(
        b.events().iter().any(|e| matches!(e, Event::Abandoned(_))),
        "the long job was abandoned"
    );
    assert_eq!(
        b.messages(JOBS).len(),
        1,
        "the abandoned job is back on the queue"
    );
    assert_eq!(b.messages(JOBS)[0].delivery_count, 1);
}
#[tokio::test(start_paused = true)]
async fn a_daemon_fault_abandons_the_job_without_blaming_it() {
    let b = broker(30);
    let exec = Arc::new(ScriptedExecutor::default());
    b.push(job_message(
        "j-fault",
        &json!({"worker": "scripted", "input": {"daemon_faults": 2}}),
    ));
    let before = hybrid_worker::telemetry::metrics::metrics().encode();
    let run = start(b.clone(), exec.clone(), options(4));
    wait_for(Duration::from_secs(600), "a reply", || {
        !b.messages(RESULTS).is_empty()
    })
    .await;
    wait_for(Duration::from_secs(60), "completion", || {
        b.locked_count() == 0
    })
    .await;
    run.stop().await;

    // Twice abandoned (not retried, not dead-lettered), then run: one reply, still attempt 1.
    let events = b.events();
    let abandoned = events
        .iter()
        .filter(|e| matches!(e, Event::Abandoned(_)))
        .count();
    assert_eq!(abandoned, 2, "{events:?}");
    assert!(
        !events.iter().any(|e| matches!(e, Event::Scheduled { .. })),
        "a daemon fault was retried as the job's failure: {events:?}"
    );
    assert!(b.dead_letters().is_empty());
    let replies = replies(&b, RESULTS);
    assert_eq!(replies.len(), 1);
    let (_, body) = &replies["j-fault"];
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["attempt"], 1);
    assert_eq!(
        exec.started(),
        vec![
            ("j-fault".into(), 1),
            ("j-fault".into(), 1),
            ("j-fault".into(), 1)
        ]
    );
    let after = hybrid_worker::telemetry::metrics::metrics().encode();
    let faults = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("hybrid_daemon_faults_total{stage=\"start\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(faults(&after) - faults(&before), 2, "{after}");
    // The job that started cleared the fault: the daemon is ready again as far as faults go.
    assert!(
        !hybrid_worker::telemetry::http::readiness()
            .daemon_faults
            .load(Ordering::SeqCst)
    );
}
