//! Durability: every message the broker accepted survives a restart, settled ones stay gone,
//! and sequence numbers keep rising.

use fe2o3_amqp_types::messaging::{Data, Properties};
use fe2o3_amqp_types::primitives::Binary;
use servicebus_emulator::entities::QueueConfig;
use servicebus_emulator::message::MessageParts;
use servicebus_emulator::queue::{EntityRef, Namespace, Settlement};
use servicebus_emulator::store::Store;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn message(text: &str) -> Result<MessageParts, Box<dyn std::error::Error>> {
    Ok(MessageParts {
        properties: Some(Properties {
            subject: Some(text.to_string()),
            ..Default::default()
        }),
        body: serde_amqp::to_vec(&Data(Binary::from(text.as_bytes().to_vec())))?,
        ..Default::default()
    })
}

fn jobs() -> EntityRef {
    EntityRef {
        queue: "jobs".into(),
        dlq: false,
    }
}

fn open(dir: &std::path::Path) -> Result<Namespace, Box<dyn std::error::Error>> {
    Ok(Namespace::new(
        QueueConfig::defaults(),
        Store::open(Some(dir))?,
    )?)
}

fn subjects(broker: &Namespace, e: &EntityRef) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for bytes in broker.peek(e, 0, 100, None)? {
        let parts = MessageParts::parse(&bytes)?;
        out.push(parts.properties.and_then(|p| p.subject).unwrap_or_default());
    }
    Ok(out)
}

#[test]
fn restart_mid_way_loses_no_accepted_message() -> TestResult {
    let dir = tempfile::tempdir()?;
    let last_seq;
    {
        let broker = open(dir.path())?;
        let mut seqs = Vec::new();
        for i in 0..5 {
            seqs.extend(broker.enqueue(&jobs(), vec![message(&format!("m{i}"))?])?);
        }
        last_seq = *seqs.last().ok_or("no sequence numbers")?;
        // m0 completed, m1 dead-lettered, m2 abandoned, m3 locked when the "crash" comes.
        for outcome in [
            Settlement::Complete,
            Settlement::DeadLetter {
                reason: Some("Bad".into()),
                description: None,
                props: Vec::new(),
            },
            Settlement::Abandon(Vec::new()),
        ] {
            let d = broker
                .acquire(&jobs(), None, 1, true)?
                .ok_or("nothing to acquire")?;
            broker.settle(d.token.ok_or("no lock token")?, outcome)?;
        }
        broker
            .acquire(&jobs(), None, 1, true)?
            .ok_or("nothing left")?;
        // Dropped without any shutdown step: everything acknowledged is already committed.
    }
    let broker = open(dir.path())?;
    assert_eq!(subjects(&broker, &jobs())?, ["m2", "m3", "m4"]);
    let dlq = EntityRef {
        queue: "jobs".into(),
        dlq: true,
    };
    assert_eq!(subjects(&broker, &dlq)?, ["m1"]);
    // The lock did not survive: m2 (abandoned once) comes first, then m3 unlocked.
    let d = broker
        .acquire(&jobs(), None, 2, true)?
        .ok_or("m2 missing")?;
    let parts = MessageParts::parse(&d.bytes)?;
    assert_eq!(parts.header.map(|h| h.delivery_count), Some(1));
    let next = broker.enqueue(&jobs(), vec![message("after")?])?;
    assert_eq!(next, [last_seq + 1], "sequence numbers keep rising");
    Ok(())
}

#[test]
fn in_memory_store_starts_empty() -> TestResult {
    let broker = Namespace::new(QueueConfig::defaults(), Store::open(None)?)?;
    assert!(broker.peek(&jobs(), 0, 10, None)?.is_empty());
    Ok(())
}

#[test]
fn topic_copies_survive_restart_and_numbers_keep_rising() -> TestResult {
    use servicebus_emulator::clock::SystemClock;
    use servicebus_emulator::entities::{Entities, parse};
    let text = r#"{"UserConfig":{"Namespaces":[{"Name":"sbemulatorns","Topics":[
        {"Name":"t","Properties":{},"Subscriptions":[
          {"Name":"a","Properties":{}},
          {"Name":"b","Properties":{},"Rules":[{"Name":"r","Properties":{
            "FilterType":"Sql","SqlFilter":{"SqlExpression":"sys.Label = 'm1'"}}}]}]}]}]}}"#;
    let entities: Entities = parse(text)?;
    let dir = tempfile::tempdir()?;
    let open = |e: Entities| -> Result<Namespace, Box<dyn std::error::Error>> {
        Ok(Namespace::with_entities(
            e,
            Store::open(Some(dir.path()))?,
            std::sync::Arc::new(SystemClock),
        )?)
    };
    let topic = EntityRef {
        queue: "t".into(),
        dlq: false,
    };
    let sub = |name: &str| EntityRef {
        queue: format!("t/Subscriptions/{name}"),
        dlq: false,
    };
    let first = {
        let broker = open(entities.clone())?;
        broker.enqueue(&topic, vec![message("m0")?, message("m1")?])?
    };
    assert_eq!(first.len(), 2);
    let broker = open(entities)?;
    assert_eq!(subjects(&broker, &sub("a"))?, ["m0", "m1"]);
    assert_eq!(subjects(&broker, &sub("b"))?, ["m1"]);
    let next = broker.enqueue(&topic, vec![message("m2")?])?;
    assert_eq!(next, [first[1] + 1]);
    Ok(())
}

#[test]
fn session_state_survives_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let results = EntityRef {
        queue: "results".into(),
        dlq: false,
    };
    {
        let broker = open(dir.path())?;
        broker.set_session_state(&results, "job-7", Some(b"step=3".to_vec()))?;
        broker.set_session_state(&results, "job-8", Some(b"x".to_vec()))?;
        broker.set_session_state(&results, "job-8", None)?;
    }
    let broker = open(dir.path())?;
    assert_eq!(
        broker.session_state(&results, "job-7")?,
        Some(b"step=3".to_vec())
    );
    assert_eq!(broker.session_state(&results, "job-8")?, None);
    Ok(())
}

#[test]
fn duplicate_detection_remembers_message_ids_across_a_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut results = QueueConfig::new("results");
    results.duplicate_detection = true;
    results.duplicate_window = std::time::Duration::from_secs(600);
    let queue = EntityRef {
        queue: "results".into(),
        dlq: false,
    };
    let with_id = |id: &str| -> Result<MessageParts, Box<dyn std::error::Error>> {
        let mut m = message(id)?;
        if let Some(p) = m.properties.as_mut() {
            p.message_id = Some(fe2o3_amqp_types::messaging::MessageId::String(id.into()));
        }
        Ok(m)
    };
    {
        let broker = Namespace::new(vec![results.clone()], Store::open(Some(dir.path()))?)?;
        assert_eq!(broker.enqueue(&queue, vec![with_id("reply-1")?])?.len(), 1);
        // A reply resent before the crash is dropped, as it always was.
        assert!(
            broker
                .enqueue(&queue, vec![with_id("reply-1")?])?
                .is_empty()
        );
    }
    let broker = Namespace::new(vec![results], Store::open(Some(dir.path()))?)?;
    // ...and so is one resent after the restart (a daemon redelivered the job and answered again).
    assert!(
        broker
            .enqueue(&queue, vec![with_id("reply-1")?])?
            .is_empty()
    );
    assert_eq!(broker.enqueue(&queue, vec![with_id("reply-2")?])?.len(), 1);
    assert_eq!(subjects(&broker, &queue)?, ["reply-1", "reply-2"]);
    Ok(())
}
