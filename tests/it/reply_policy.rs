//! Where replies may go (`queues.reply_allowed`), what happens to a job whose reply cannot be
//! sent, and that a send refused on one link leaves the connection up.

use std::sync::Arc;
use std::time::Duration;

use hybrid_worker::broker::memory::{Event, MemoryBroker};
use hybrid_worker::broker::{Broker, BrokerError};
use serde_json::{Value, json};

use crate::helpers::*;

fn broker() -> Arc<MemoryBroker> {
    Arc::new(MemoryBroker::new(JOBS, Duration::from_secs(30), 10))
}

fn job_replying_to(id: &str, reply_to: &str) -> hybrid_worker::broker::OutgoingMessage {
    let mut m = job_message(id, &json!({"worker": "scripted", "input": {"ms": 10}}));
    m.reply_to = Some(reply_to.into());
    m
}

#[tokio::test(start_paused = true)]
async fn a_job_naming_a_reply_queue_that_is_not_allowed_is_refused_without_running() {
    let b = broker();
    let exec = Arc::new(ScriptedExecutor::default());
    for (id, reply_to) in [
        ("missing", "no-such-queue"),
        ("dlq", "jobs/$DeadLetterQueue"),
        ("loop", JOBS),
    ] {
        b.push(job_replying_to(id, reply_to));
    }
    let run = start(b.clone(), exec.clone(), options(2));
    wait_for(Duration::from_secs(60), "three dead letters", || {
        b.dead_letters().len() == 3
    })
    .await;
    run.stop().await;
    assert!(exec.started().is_empty(), "nothing ran");
    for dl in b.dead_letters() {
        assert_eq!(dl.reason, "PolicyDenied");
        assert!(dl.description.contains("ReplyTo"), "{}", dl.description);
    }
    assert!(
        !b.events().iter().any(|e| matches!(e, Event::Sent { .. })),
        "no reply went anywhere"
    );
    assert_eq!(b.messages(JOBS).len(), 0, "and no job came back");
}

#[tokio::test(start_paused = true)]
async fn an_allowed_reply_queue_gets_the_reply() {
    let b = broker();
    let exec = Arc::new(ScriptedExecutor::default());
    b.push(job_replying_to("ok", "Flow-Replies"));
    let mut opts = options(1);
    opts.queues.reply_allowed = vec!["flow-replies".into()];
    let run = start(b.clone(), exec.clone(), opts);
    wait_for(Duration::from_secs(60), "a reply", || {
        !b.messages("flow-replies").is_empty()
    })
    .await;
    run.stop().await;
    assert!(b.dead_letters().is_empty());
    assert!(b.messages(RESULTS).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_reply_that_cannot_be_sent_dead_letters_the_job_with_its_result_and_never_reruns() {
    let b = broker();
    let exec = Arc::new(ScriptedExecutor::default());
    b.fail_sends_to(RESULTS);
    b.push(job_message(
        "nosend",
        &json!({"worker": "scripted", "input": {"ms": 10}}),
    ));
    let run = start(b.clone(), exec.clone(), options(1));
    wait_for(Duration::from_secs(60), "a dead letter", || {
        !b.dead_letters().is_empty()
    })
    .await;
    // Long enough for a redelivery, had the message been abandoned.
    tokio::time::sleep(Duration::from_secs(60)).await;
    run.stop().await;
    assert_eq!(exec.started().len(), 1, "the job ran once");
    assert!(!b.events().iter().any(|e| matches!(e, Event::Abandoned(_))));
    let [dl] = b.dead_letters().try_into().expect("one dead letter");
    assert_eq!(dl.reason, "ReplyUndeliverable");
    assert!(
        dl.description.contains("could not be sent"),
        "{}",
        dl.description
    );
    let app = &dl.message.message.application;
    assert_eq!(
        app.get("result_status").map(String::as_str),
        Some("succeeded")
    );
    let result: Value = serde_json::from_str(&app["result"]).expect("the result is kept as JSON");
    assert_eq!(result["job_id"], "nosend");
    assert_eq!(result["status"], "succeeded");
}

#[tokio::test]
async fn a_send_refused_on_one_link_leaves_the_connection_up() {
    let emu = crate::servicebus::emulator(Duration::from_secs(30)).await;
    let sb = crate::servicebus::client(&emu, Duration::from_secs(3600));
    sb.connect().await.expect("connects");
    let message = || job_message("x", &json!({"worker": "w"}));
    for queue in ["jobs/$DeadLetterQueue", "no-such-queue"] {
        let refused = sb.send(queue, message()).await;
        assert!(
            matches!(
                refused,
                Err(BrokerError::NotFound(_) | BrokerError::Refused(_))
            ),
            "{queue}: {refused:?}"
        );
    }
    assert_eq!(
        sb.stats.connects.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "a refused link is not a broken connection"
    );
    sb.send(JOBS, message())
        .await
        .expect("other queues still take sends");
    sb.close().await;
    emu.shutdown().await;
}
