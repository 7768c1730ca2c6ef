//! The Service Bus client's session receiving (`docs/sessions.md`) against the embedded
//! emulator started in-process: accept, order, renewal and settlement under the session lock,
//! release on close, several sessions held on one connection.

use std::sync::Arc;
use std::time::Duration;

use hybrid_worker::broker::Broker;
use hybrid_worker::emulator::clock::SystemClock;
use hybrid_worker::emulator::entities::QueueConfig;
use hybrid_worker::emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use serde_json::json;

use crate::helpers::*;
use crate::servicebus::client;

/// An emulator whose `jobs` queue requires sessions (lock 5 s).
async fn session_emulator() -> EmulatorHandle {
    let mut config = EmulatorConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.clock = Arc::new(SystemClock);
    let mut jobs = QueueConfig::new(JOBS);
    jobs.lock_duration = Duration::from_secs(5);
    jobs.requires_session = true;
    let mut results = QueueConfig::new(RESULTS);
    results.requires_session = true;
    config.queues = vec![jobs, results];
    Emulator::start(config).await.expect("emulator starts")
}

fn keyed(key: &str, id: &str) -> hybrid_worker::broker::OutgoingMessage {
    let mut msg = job_message(id, &json!({"worker": "w"}));
    msg.session_id = Some(key.into());
    msg
}

#[tokio::test]
async fn sessions_are_accepted_received_in_order_renewed_settled_and_released() {
    let emu = session_emulator().await;
    let sb = client(&emu, Duration::from_secs(3600));
    sb.connect().await.expect("connects");
    let wait = Duration::from_secs(1);
    assert!(
        sb.accept_session(wait).await.expect("accept").is_none(),
        "no session has messages yet"
    );
    // A refused accept leaves the connection usable.
    for (key, id) in [("a", "a1"), ("b", "b1"), ("a", "a2")] {
        sb.send(JOBS, keyed(key, id)).await.expect("send");
    }
    let first = sb
        .accept_session(wait)
        .await
        .expect("accept")
        .expect("a session");
    let second = sb
        .accept_session(wait)
        .await
        .expect("accept")
        .expect("another");
    let (a, b) = if first.session_id() == "a" {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!((a.session_id(), b.session_id()), ("a", "b"));
    assert!(
        sb.accept_session(wait).await.expect("accept").is_none(),
        "both held"
    );
    let a1 = a.receive(wait).await.expect("receive").expect("a1");
    assert_eq!(a1.properties.message_id.as_deref(), Some("a1"));
    // Each session's renewal is answered on its own management link.
    for _ in 0..3 {
        let until_a = a.renew().await.expect("renew a");
        let until_b = b.renew().await.expect("renew b");
        assert!(until_a > tokio::time::Instant::now() + Duration::from_secs(3));
        assert!(until_b > tokio::time::Instant::now() + Duration::from_secs(3));
    }
    a.complete(a1.lock_token).await.expect("complete a1");
    let a2 = a.receive(wait).await.expect("receive").expect("a2");
    assert_eq!(a2.properties.message_id.as_deref(), Some("a2"));
    assert!(
        a.receive(wait).await.expect("receive").is_none(),
        "a is drained"
    );
    // Closing a session releases it and the message it did not settle, uncounted.
    a.close().await;
    let again = sb
        .accept_session(wait)
        .await
        .expect("accept")
        .expect("a again");
    assert_eq!(again.session_id(), "a");
    let redelivered = again
        .receive(wait)
        .await
        .expect("receive")
        .expect("a2 again");
    assert_eq!(redelivered.properties.message_id.as_deref(), Some("a2"));
    assert_eq!(redelivered.delivery_count, 0);
    again
        .dead_letter_keeping(
            redelivered.lock_token,
            "Test",
            "dead-lettered in a session",
            &Default::default(),
        )
        .await
        .expect("dead-letter");
    let b1 = b.receive(wait).await.expect("receive").expect("b1");
    b.complete(b1.lock_token).await.expect("complete b1");
    again.close().await;
    b.close().await;
    sb.close().await;
}
