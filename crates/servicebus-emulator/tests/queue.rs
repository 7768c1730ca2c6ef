//! Queue semantics at the broker level (`docs/servicebus-protocol.md` §4, §5.2, §7), without the
//! wire in between.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp_types::messaging::{Data, MessageId, Properties};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue};
use servicebus_emulator::clock::ManualClock;
use servicebus_emulator::entities::QueueConfig;
use servicebus_emulator::error::SbError;
use servicebus_emulator::message::MessageParts;
use servicebus_emulator::queue::{EntityRef, Namespace, Settlement};
use servicebus_emulator::store::Store;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn msg(id: &str, session: Option<&str>) -> Result<MessageParts, Box<dyn std::error::Error>> {
    Ok(MessageParts {
        properties: Some(Properties {
            message_id: Some(MessageId::String(id.into())),
            group_id: session.map(str::to_string),
            ..Default::default()
        }),
        body: serde_amqp::to_vec(&Data(Binary::from(id.as_bytes().to_vec())))?,
        ..Default::default()
    })
}

fn queue(name: &str) -> EntityRef {
    EntityRef {
        queue: name.into(),
        dlq: false,
    }
}

fn broker(cfg: QueueConfig) -> Result<Namespace, Box<dyn std::error::Error>> {
    Ok(Namespace::new(vec![cfg], Store::open(None)?)?)
}

const T0: i64 = 1_800_000_000_000;

fn broker_at(
    cfg: QueueConfig,
) -> Result<(Namespace, Arc<ManualClock>), Box<dyn std::error::Error>> {
    let clock = Arc::new(ManualClock::new(T0));
    let b = Namespace::with_clock(vec![cfg], Store::open(None)?, clock.clone())?;
    Ok((b, clock))
}

fn delivery_count(bytes: &[u8]) -> Result<u32, Box<dyn std::error::Error>> {
    let parts = MessageParts::parse(bytes)?;
    Ok(parts.header.map(|h| h.delivery_count).unwrap_or(0))
}

#[test]
fn release_does_not_count_abandon_does() -> TestResult {
    let b = broker(QueueConfig::new("q"))?;
    b.enqueue(&queue("q"), vec![msg("a", None)?])?;
    let d = b.acquire(&queue("q"), None, 1, true)?.ok_or("none")?;
    b.settle(d.token.ok_or("token")?, Settlement::Release)?;
    let d = b.acquire(&queue("q"), None, 1, true)?.ok_or("none")?;
    assert_eq!(delivery_count(&d.bytes)?, 0);
    b.settle(d.token.ok_or("token")?, Settlement::Abandon(Vec::new()))?;
    let d = b.acquire(&queue("q"), None, 1, true)?.ok_or("none")?;
    assert_eq!(delivery_count(&d.bytes)?, 1);
    Ok(())
}

#[test]
fn expired_lock_is_lost_and_redelivered() -> TestResult {
    let mut cfg = QueueConfig::new("q");
    cfg.lock_duration = Duration::from_secs(30);
    let (b, clock) = broker_at(cfg)?;
    b.enqueue(&queue("q"), vec![msg("a", None)?])?;
    let d = b.acquire(&queue("q"), None, 1, true)?.ok_or("none")?;
    clock.advance(29_000);
    b.sweep()?;
    assert!(
        b.acquire(&queue("q"), None, 1, true)?.is_none(),
        "still locked"
    );
    clock.advance(1_000);
    b.sweep()?;
    let err = b.settle(d.token.ok_or("token")?, Settlement::Complete);
    assert!(matches!(err, Err(SbError::LockLost)));
    let again = b.acquire(&queue("q"), None, 1, true)?.ok_or("none")?;
    assert_eq!(again.seq, d.seq);
    assert_eq!(delivery_count(&again.bytes)?, 1);
    let renewed = b.renew_locks(&[again.token.ok_or("token")?])?;
    assert_eq!(renewed.len(), 1);
    Ok(())
}

#[test]
fn max_delivery_count_dead_letters() -> TestResult {
    let mut cfg = QueueConfig::new("q");
    cfg.max_delivery_count = 2;
    let b = broker(cfg)?;
    b.enqueue(&queue("q"), vec![msg("a", None)?])?;
    for _ in 0..2 {
        let d = b.acquire(&queue("q"), None, 1, true)?.ok_or("none")?;
        b.settle(d.token.ok_or("token")?, Settlement::Abandon(Vec::new()))?;
    }
    assert!(b.acquire(&queue("q"), None, 1, true)?.is_none());
    let dlq = EntityRef {
        queue: "q".into(),
        dlq: true,
    };
    let d = b.acquire(&dlq, None, 1, true)?.ok_or("not dead-lettered")?;
    let parts = MessageParts::parse(&d.bytes)?;
    let reason = parts
        .app_props
        .as_ref()
        .and_then(|p| p.0.get("DeadLetterReason").cloned());
    assert_eq!(
        reason,
        Some(SimpleValue::String("MaxDeliveryCountExceeded".into()))
    );
    Ok(())
}

#[test]
fn duplicates_are_dropped_within_the_window() -> TestResult {
    let mut cfg = QueueConfig::new("q");
    cfg.duplicate_detection = true;
    let b = broker(cfg)?;
    assert_eq!(b.enqueue(&queue("q"), vec![msg("same", None)?])?.len(), 1);
    assert!(b.enqueue(&queue("q"), vec![msg("same", None)?])?.is_empty());
    assert_eq!(b.enqueue(&queue("q"), vec![msg("other", None)?])?.len(), 1);
    Ok(())
}

#[test]
fn sessions_lock_exclusively_and_filter_messages() -> TestResult {
    let mut cfg = QueueConfig::new("s");
    cfg.requires_session = true;
    let b = broker(cfg)?;
    let s = queue("s");
    assert!(matches!(
        b.enqueue(&s, vec![msg("no-session", None)?]),
        Err(SbError::NotAllowed(_))
    ));
    b.enqueue(&s, vec![msg("a1", Some("A"))?, msg("b1", Some("B"))?])?;
    let (sid, _) = b.lock_session(&s, None, 1)?.ok_or("no session")?;
    assert_eq!(sid, "A");
    assert!(matches!(
        b.lock_session(&s, Some("A"), 2),
        Err(SbError::SessionCannotBeLocked(_))
    ));
    let (next, _) = b.lock_session(&s, None, 2)?.ok_or("no second session")?;
    assert_eq!(next, "B");
    assert!(b.lock_session(&s, None, 3)?.is_none());
    let d = b.acquire(&s, Some("B"), 2, true)?.ok_or("none")?;
    assert_eq!(MessageParts::parse(&d.bytes)?.session_id(), Some("B"));
    b.release_link(2);
    assert!(
        b.acquire(&s, Some("B"), 3, true)?.is_some(),
        "lock freed on close"
    );
    b.set_session_state(&s, "A", Some(b"state".to_vec()))?;
    assert_eq!(b.session_state(&s, "A")?, Some(b"state".to_vec()));
    assert_eq!(b.list_sessions(&s, None)?, ["A", "B"]);
    assert_eq!(b.list_sessions(&s, Some(0))?, ["A"], "only A has state");
    Ok(())
}

#[test]
fn scheduled_messages_activate_on_time() -> TestResult {
    let (b, clock) = broker_at(QueueConfig::new("q"))?;
    b.enqueue(&queue("q"), vec![scheduled("later", T0 + 60_000)?])?;
    clock.advance(59_999);
    b.sweep()?;
    assert!(b.acquire(&queue("q"), None, 1, true)?.is_none());
    clock.advance(1);
    b.sweep()?;
    assert!(b.acquire(&queue("q"), None, 1, true)?.is_some());
    Ok(())
}

#[test]
fn expired_messages_dead_letter_or_vanish() -> TestResult {
    for dead_letter in [true, false] {
        let mut cfg = QueueConfig::new("q");
        cfg.default_ttl = Duration::from_secs(10);
        cfg.dead_letter_on_expiration = dead_letter;
        let (b, clock) = broker_at(cfg)?;
        b.enqueue(&queue("q"), vec![msg("old", None)?])?;
        clock.advance(10_000);
        assert!(
            b.acquire(&queue("q"), None, 1, true)?.is_none(),
            "never delivered"
        );
        b.sweep()?;
        let dlq = EntityRef {
            queue: "q".into(),
            dlq: true,
        };
        assert_eq!(b.peek(&dlq, 0, 10, None)?.len(), usize::from(dead_letter));
        assert!(b.peek(&queue("q"), 0, 10, None)?.is_empty());
    }
    Ok(())
}

fn scheduled(id: &str, at: i64) -> Result<MessageParts, Box<dyn std::error::Error>> {
    use fe2o3_amqp_types::primitives::{Timestamp, Value};
    let mut m = msg(id, None)?;
    m.set_annotation(
        "x-opt-scheduled-enqueue-time",
        Value::Timestamp(Timestamp::from_milliseconds(at)),
    );
    Ok(m)
}

#[test]
fn scheduled_messages_wait_and_can_be_cancelled() -> TestResult {
    use fe2o3_amqp_types::primitives::{Timestamp, Value};
    let b = broker(QueueConfig::new("q"))?;
    let at = servicebus_emulator::queue::now_ms() + 60_000;
    let mut m = msg("later", None)?;
    m.set_annotation(
        "x-opt-scheduled-enqueue-time",
        Value::Timestamp(Timestamp::from_milliseconds(at)),
    );
    let seqs = b.enqueue(&queue("q"), vec![m])?;
    assert!(b.acquire(&queue("q"), None, 1, true)?.is_none());
    assert_eq!(b.peek(&queue("q"), 0, 10, None)?.len(), 1);
    b.cancel_scheduled(&queue("q"), &seqs)?;
    assert!(b.peek(&queue("q"), 0, 10, None)?.is_empty());
    Ok(())
}

#[test]
fn deferred_messages_only_by_sequence_number() -> TestResult {
    let b = broker(QueueConfig::new("q"))?;
    b.enqueue(&queue("q"), vec![msg("d", None)?])?;
    let d = b.acquire(&queue("q"), None, 1, true)?.ok_or("none")?;
    b.settle(d.token.ok_or("token")?, Settlement::Defer(Vec::new()))?;
    assert!(b.acquire(&queue("q"), None, 1, true)?.is_none());
    let got = b.receive_deferred(&queue("q"), &[d.seq], true, 1)?;
    assert_eq!(got.len(), 1);
    b.settle(got[0].token.ok_or("token")?, Settlement::Complete)?;
    assert!(matches!(
        b.receive_deferred(&queue("q"), &[d.seq], true, 1),
        Err(SbError::MessageNotFound(_))
    ));
    Ok(())
}

#[test]
fn forwarding_moves_messages_and_dead_letters() -> TestResult {
    use servicebus_emulator::clock::SystemClock;
    use servicebus_emulator::entities::parse;
    let text = r#"{"UserConfig":{"Namespaces":[{"Name":"n",
        "Queues":[
          {"Name":"in","Properties":{"ForwardTo":"mid"}},
          {"Name":"mid","Properties":{"ForwardTo":"out"}},
          {"Name":"out","Properties":{"ForwardDeadLetteredMessagesTo":"dead"}},
          {"Name":"dead","Properties":{}}],
        "Topics":[{"Name":"t","Properties":{},"Subscriptions":[
          {"Name":"s","Properties":{"ForwardTo":"out"}}]}]}]}}"#;
    let b = Namespace::with_entities(parse(text)?, Store::open(None)?, Arc::new(SystemClock))?;
    b.enqueue(&queue("in"), vec![msg("a", None)?])?;
    assert!(b.acquire(&queue("in"), None, 1, true)?.is_none());
    assert!(b.acquire(&queue("mid"), None, 1, true)?.is_none());
    let d = b
        .acquire(&queue("out"), None, 1, true)?
        .ok_or("not forwarded")?;
    b.settle(
        d.token.ok_or("token")?,
        Settlement::DeadLetter {
            reason: Some("Bad".into()),
            description: None,
            props: Vec::new(),
        },
    )?;
    let out_dlq = EntityRef {
        queue: "out".into(),
        dlq: true,
    };
    assert!(
        b.peek(&out_dlq, 0, 10, None)?.is_empty(),
        "forwarded, not kept"
    );
    let dead = b
        .acquire(&queue("dead"), None, 1, true)?
        .ok_or("dead letter not forwarded")?;
    let parts = MessageParts::parse(&dead.bytes)?;
    let reason = parts
        .app_props
        .as_ref()
        .and_then(|p| p.0.get("DeadLetterReason").cloned());
    assert_eq!(reason, Some(SimpleValue::String("Bad".into())));
    let topic = EntityRef {
        queue: "t".into(),
        dlq: false,
    };
    b.enqueue(&topic, vec![msg("via-topic", None)?])?;
    assert!(
        b.acquire(&queue("out"), None, 1, true)?.is_some(),
        "subscription forwarded"
    );
    Ok(())
}

/// A message received under a held session lock is covered by it (as on Service Bus): its own
/// lock does not run out and no failed delivery is counted while the session is renewed; once
/// the session lock runs out, the message lock goes with it.
#[test]
fn a_lapsed_session_lock_gives_its_messages_back_in_order() -> TestResult {
    let mut cfg = QueueConfig::new("s");
    cfg.requires_session = true;
    cfg.lock_duration = Duration::from_secs(5);
    let (b, clock) = broker_at(cfg)?;
    let s = queue("s");
    b.enqueue(
        &s,
        vec![
            msg("a1", Some("A"))?,
            msg("a2", Some("A"))?,
            msg("a3", Some("A"))?,
        ],
    )?;
    b.lock_session(&s, Some("A"), 1)?.ok_or("no session")?;
    let first = b.acquire(&s, Some("A"), 1, true)?.ok_or("none")?;
    b.settle(first.token.ok_or("token")?, Settlement::Complete)?;
    clock.advance(4_000);
    // Taken a second before the session lock lapses: its own lock would last 4 s longer.
    let second = b.acquire(&s, Some("A"), 1, true)?.ok_or("none")?;
    clock.advance(2_000);
    b.lock_session(&s, Some("A"), 2)?
        .ok_or("the lapsed session was not free")?;
    assert!(
        b.acquire(&s, Some("A"), 2, true)?.is_none(),
        "a3 must wait while a2 is still held by the lapsed holder"
    );
    b.sweep()?;
    assert!(matches!(
        b.settle(second.token.ok_or("token")?, Settlement::Complete),
        Err(SbError::LockLost)
    ));
    let again = b
        .acquire(&s, Some("A"), 2, true)?
        .ok_or("a2 not given back")?;
    assert_eq!(again.seq, second.seq, "the new holder starts at a2");
    assert_eq!(
        delivery_count(&again.bytes)?,
        1,
        "the lapse counts a delivery"
    );
    Ok(())
}

#[test]
fn session_messages_are_covered_by_the_session_lock() -> TestResult {
    let mut cfg = QueueConfig::new("s");
    cfg.requires_session = true;
    cfg.lock_duration = Duration::from_secs(5);
    let (b, clock) = broker_at(cfg)?;
    let s = queue("s");
    b.enqueue(&s, vec![msg("a1", Some("A"))?, msg("a2", Some("A"))?])?;
    b.lock_session(&s, Some("A"), 1)?.ok_or("no session")?;
    let first = b.acquire(&s, Some("A"), 1, true)?.ok_or("none")?;
    for _ in 0..3 {
        clock.advance(3_000);
        b.renew_session_lock(&s, "A")?;
        b.sweep()?;
    }
    b.settle(first.token.ok_or("token")?, Settlement::Complete)?;
    let second = b.acquire(&s, Some("A"), 1, true)?.ok_or("none")?;
    assert_eq!(delivery_count(&second.bytes)?, 0);
    clock.advance(5_000);
    b.sweep()?;
    assert!(matches!(
        b.settle(second.token.ok_or("token")?, Settlement::Complete),
        Err(SbError::LockLost)
    ));
    b.lock_session(&s, Some("A"), 2)?
        .ok_or("session not free")?;
    let again = b
        .acquire(&s, Some("A"), 2, true)?
        .ok_or("not redelivered")?;
    assert_eq!(
        delivery_count(&again.bytes)?,
        1,
        "counted once, with the session"
    );
    Ok(())
}
