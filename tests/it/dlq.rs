//! `hybrid-worker dlq …` as operators run it, against the embedded emulator on 127.0.0.1:0:
//! the purge guard, dead-letter queues of large messages, replay of every body type, and
//! listing what hostile senders wrote.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use fe2o3_amqp_types::messaging::{
    AmqpSequence, AmqpValue, ApplicationProperties, Body, Data, Message, MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Value};
use hybrid_worker::broker::Broker;
use hybrid_worker::emulator::EmulatorHandle;
use hybrid_worker::servicebus::client::{ServiceBusBroker, ServiceBusConfig};
use hybrid_worker::servicebus::connection_string::ConnectionString;
use hybrid_worker::servicebus::message::Peeked;
use serde_json::Value as Json;

use crate::helpers::JOBS;
use crate::servicebus::emulator;

const HOUR: Duration = Duration::from_secs(3600);
const DLQ: &str = "jobs/$DeadLetterQueue";

/// A client whose own entity (peek, receive, settle) is `entity`.
fn client_for(emu: &EmulatorHandle, entity: &str) -> ServiceBusBroker {
    let cs = ConnectionString::parse(&emu.connection_string()).expect("connection string");
    ServiceBusBroker::new(ServiceBusConfig::from_connection_string(&cs, entity, HOUR))
}

fn message(id: &str, body: Body<Value>) -> Message<Body<Value>> {
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            message_id: Some(MessageId::String(id.into())),
            ..Default::default()
        }),
        application_properties: Some(
            ApplicationProperties::builder()
                .insert("priority", SimpleValue::Int(7))
                .build(),
        ),
        body,
        footer: None,
    }
}

fn data(bytes: Vec<u8>) -> Body<Value> {
    Body::Data(vec![Data(Binary::from(bytes))].into())
}

/// Sends each message to `jobs` and dead-letters it with `description`.
async fn dead_letter_all(
    emu: &EmulatorHandle,
    messages: Vec<Message<Body<Value>>>,
    description: &str,
) {
    let sb = client_for(emu, JOBS);
    let count = messages.len();
    for m in messages {
        sb.send_message(JOBS, m).await.expect("send");
    }
    let mut settled = 0;
    while settled < count {
        let got = sb
            .receive(count - settled, Duration::from_secs(5))
            .await
            .expect("receive");
        assert!(!got.is_empty(), "every message sent arrives");
        for d in got {
            sb.dead_letter(d.lock_token, "HandlerError", description)
                .await
                .expect("dead-letter");
            settled += 1;
        }
    }
    sb.close().await;
}

/// The data body length that makes `message(id, …)` encode to exactly `size` bytes.
fn body_to_fit(id: &str, size: usize) -> usize {
    use fe2o3_amqp_types::messaging::message::__private::Serializable;
    let probe = 200_000;
    let encoded = serde_amqp::to_vec(&Serializable(message(id, data(vec![0; probe]))))
        .expect("encode")
        .len();
    probe + size - encoded
}

/// Everything in `entity`, peeked.
async fn peek_all(emu: &EmulatorHandle, entity: &str) -> Vec<Peeked> {
    let sb = client_for(emu, entity);
    let mut out = Vec::new();
    loop {
        let from = out
            .last()
            .and_then(|p: &Peeked| p.properties.sequence_number)
            .map_or(1, |s| s + 1);
        let page = sb.peek_page(from).await.expect("peek");
        if page.is_empty() {
            break;
        }
        out.extend(page);
    }
    sb.close().await;
    out
}

/// `cmd` (the binary, or what starts it) pointed at the emulator, with quiet text logs.
fn aimed_at(mut cmd: Command, emu: &EmulatorHandle) -> Command {
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env(
            "HYBRID__SERVICEBUS__CONNECTION_STRING",
            emu.connection_string(),
        )
        .env("HYBRID__LOG__FORMAT", "text")
        .env("HYBRID__LOG__LEVEL", "warn")
        .env_remove("HYBRID_CONFIG");
    cmd
}

/// Runs `hybrid-worker dlq ARGS` against the emulator with stdin not a terminal.
async fn dlq(emu: &EmulatorHandle, args: &[&str]) -> Output {
    let mut cmd = aimed_at(Command::new(env!("CARGO_BIN_EXE_hybrid-worker")), emu);
    cmd.arg("dlq").args(args).stdin(Stdio::null());
    tokio::task::spawn_blocking(move || cmd.output().expect("run hybrid-worker"))
        .await
        .expect("join")
}

fn audit(out: &Output) -> Vec<Json> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_off_a_terminal_needs_yes_and_without_it_deletes_nothing() {
    let emu = emulator(Duration::from_secs(30)).await;
    let three = (0..3)
        .map(|i| message(&format!("p{i}"), data(b"{}".to_vec())))
        .collect();
    dead_letter_all(&emu, three, "bad").await;

    let refused = dlq(&emu, &["purge"]).await;
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--yes"),
        "{}",
        text(&refused)
    );
    assert_eq!(peek_all(&emu, DLQ).await.len(), 3, "nothing was deleted");

    let dry = dlq(&emu, &["purge", "--dry-run"]).await;
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    assert_eq!(audit(&dry).len(), 3, "one audit line per dead letter");
    assert_eq!(peek_all(&emu, DLQ).await.len(), 3);

    let purged = dlq(&emu, &["purge", "--yes"]).await;
    assert_eq!(purged.status.code(), Some(0), "{}", text(&purged));
    let lines = audit(&purged);
    assert_eq!(lines.len(), 3);
    assert!(
        lines
            .iter()
            .all(|l| l["action"] == "purge" && l["result"] == "purged")
    );
    assert!(peek_all(&emu, DLQ).await.is_empty());
    emu.shutdown().await;
}

/// Runs `hybrid-worker dlq purge` on a terminal (a pty from util-linux `script`), typing
/// `answer`; `None` when `script` is not installed.
async fn purge_at_a_terminal(emu: &EmulatorHandle, answer: &str) -> Option<Output> {
    let line = format!("{} dlq purge", env!("CARGO_BIN_EXE_hybrid-worker"));
    let mut cmd = aimed_at(Command::new("script"), emu);
    cmd.args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let answer = format!("{answer}\n");
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = cmd.spawn().ok()?;
        // The prompt is up before the answer is read; what is typed early waits in the pty.
        child.stdin.take()?.write_all(answer.as_bytes()).ok()?;
        child.wait_with_output().ok()
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_at_a_terminal_asks_and_deletes_only_on_yes() {
    let emu = emulator(Duration::from_secs(30)).await;
    let two = (0..2)
        .map(|i| message(&format!("t{i}"), data(b"{}".to_vec())))
        .collect();
    dead_letter_all(&emu, two, "bad").await;
    let Some(declined) = purge_at_a_terminal(&emu, "no").await else {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    };
    let screen = String::from_utf8_lossy(&declined.stdout);
    assert!(screen.contains("Delete 2 dead letter(s)"), "{screen}");
    assert!(screen.contains("nothing was deleted"), "{screen}");
    assert_eq!(peek_all(&emu, DLQ).await.len(), 2);

    let accepted = purge_at_a_terminal(&emu, "yes")
        .await
        .expect("script ran before");
    let screen = String::from_utf8_lossy(&accepted.stdout);
    assert_eq!(screen.matches("\"purged\"").count(), 2, "{screen}");
    assert!(peek_all(&emu, DLQ).await.is_empty());
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_dead_letters_can_be_listed_shown_replayed_and_purged() {
    let emu = emulator(Duration::from_secs(30)).await;
    let big = (0..5)
        .map(|i| message(&format!("big{i}"), data(vec![b'x'; 250_000])))
        .collect();
    dead_letter_all(&emu, big, "too big to page by count").await;

    // The emulator answers a peek of 100 with what fits its 1 MiB response, as Service Bus
    // returns fewer than asked for.
    let sb = client_for(&emu, DLQ);
    let first = sb
        .peek(1, 100)
        .await
        .expect("a peek fits its response link");
    assert!((1..5).contains(&first.len()), "{} of 5 fit", first.len());
    sb.close().await;

    let listed = dlq(&emu, &["list"]).await;
    assert_eq!(listed.status.code(), Some(0), "{}", text(&listed));
    let rows = String::from_utf8_lossy(&listed.stdout).lines().count();
    assert_eq!(rows, 1 + 5, "a header and five rows: {}", text(&listed));

    let one = dlq(&emu, &["list", "--limit", "1"]).await;
    assert_eq!(
        String::from_utf8_lossy(&one.stdout).lines().count(),
        2,
        "{}",
        text(&one)
    );

    let seq = peek_all(&emu, DLQ).await[4]
        .properties
        .sequence_number
        .expect("seq");
    let shown = dlq(&emu, &["show", "--sequence", &seq.to_string()]).await;
    assert_eq!(shown.status.code(), Some(0), "{}", text(&shown));

    let dry = dlq(&emu, &["replay", "--dry-run"]).await;
    assert_eq!(audit(&dry).len(), 5, "{}", text(&dry));

    let purged = dlq(&emu, &["purge", "--yes"]).await;
    assert_eq!(purged.status.code(), Some(0), "{}", text(&purged));
    assert_eq!(audit(&purged).len(), 5);
    assert!(peek_all(&emu, DLQ).await.is_empty());
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_carries_every_body_type_and_keeps_what_it_cannot_send() {
    let emu = emulator(Duration::from_secs(30)).await;
    let mut map = OrderedMap::new();
    map.insert(Value::from("worker"), Value::from("w"));
    let value = Body::Value(AmqpValue(Value::Map(map)));
    let sequence =
        Body::Sequence(vec![AmqpSequence(vec![Value::Int(1), Value::from("two")])].into());
    // A dead letter that just fits the 256 KiB send limit; its copy (with its new MessageId
    // and job id) does not.
    let oversized_len = body_to_fit("oversized", 262_144 - 4);
    let oversized = data(vec![b'y'; oversized_len]);
    dead_letter_all(
        &emu,
        vec![
            message("value", value.clone()),
            message("sequence", sequence.clone()),
            message("oversized", oversized),
        ],
        "failed",
    )
    .await;

    let replayed = dlq(&emu, &["replay"]).await;
    assert_eq!(
        replayed.status.code(),
        Some(1),
        "one could not be moved: {}",
        text(&replayed)
    );
    let lines = audit(&replayed);
    let result = |id: &str| {
        lines
            .iter()
            .find(|l| l["job_id"] == id)
            .map(|l| l["result"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(result("value"), "moved", "{}", text(&replayed));
    assert_eq!(result("sequence"), "moved");
    assert!(
        result("oversized").starts_with("failed:"),
        "{}",
        text(&replayed)
    );
    assert!(result("oversized").contains("dead letter kept"));

    let left = peek_all(&emu, DLQ).await;
    assert_eq!(left.len(), 1, "the one not sent stays");
    assert_eq!(left[0].properties.message_id.as_deref(), Some("oversized"));
    assert_eq!(left[0].body.len(), oversized_len, "unchanged");

    let jobs = peek_all(&emu, JOBS).await;
    assert_eq!(jobs.len(), 2);
    for (copy, body, id) in [
        (&jobs[0], &value, "value"),
        (&jobs[1], &sequence, "sequence"),
    ] {
        assert_eq!(
            &copy.message.body, body,
            "the body section is carried as it was"
        );
        let app = &copy.message.application_properties.as_ref().expect("app").0;
        assert_eq!(
            app.get("priority"),
            Some(&SimpleValue::Int(7)),
            "typed properties stay"
        );
        assert_eq!(app.get("job_id"), Some(&SimpleValue::String(id.into())));
        assert!(app.get("DeadLetterReason").is_none());
    }
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_takes_control_characters_and_length_out_of_what_senders_wrote() {
    let emu = emulator(Duration::from_secs(30)).await;
    let long_id = "i".repeat(100_000);
    dead_letter_all(
        &emu,
        vec![message(
            &long_id,
            data(b"{\"worker\":\"\\u001b[2Jw\"}".to_vec()),
        )],
        "\u{1b}[2J\u{1b}[HDLQ EMPTY\nsecond line",
    )
    .await;
    let listed = dlq(&emu, &["list"]).await;
    assert_eq!(listed.status.code(), Some(0), "{}", text(&listed));
    let stdout = String::from_utf8_lossy(&listed.stdout);
    let shown: String = stdout.chars().take(2_000).collect();
    assert!(!stdout.contains('\u{1b}'), "no terminal escapes: {shown:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "one row per dead letter: {shown:?}");
    assert!(lines[1].contains("DLQ EMPTY second line"), "{shown:?}");
    assert!(
        lines[1].chars().count() < 400,
        "long fields are cut: {} chars",
        lines[1].len()
    );
    emu.shutdown().await;
}
