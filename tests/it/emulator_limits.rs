//! What the embedded emulator holds for clients that never authenticate: a bounded number of
//! connections, each for a bounded time, so a flood of them on loopback neither exhausts the
//! process's descriptors nor keeps real clients out for long.

use std::time::Duration;

use std::sync::atomic::Ordering;

use hybrid_worker::broker::{Broker, BrokerError, OutgoingMessage};
use hybrid_worker::emulator::entities::QueueConfig;
use hybrid_worker::emulator::{Emulator, EmulatorConfig};
use hybrid_worker::servicebus::client::{ServiceBusBroker, ServiceBusConfig};
use hybrid_worker::servicebus::connection_string::ConnectionString;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::helpers::{JOBS, RESULTS, job_message};

/// Established TCP connections whose local port is `port`: the server's ends of the
/// connections the emulator holds (another test's descriptors do not count).
fn held_connections(port: u16) -> usize {
    let local = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "01"
                })
                .count()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_that_never_authenticate_is_bounded_and_locks_no_one_out() {
    let mut config = EmulatorConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.auth_timeout = Duration::from_secs(4);
    let bound = config.max_unauthenticated;
    let emu = Emulator::start(config).await.expect("emulator starts");

    const FLOOD: usize = 1100;
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(TcpStream::connect(emu.local_addr()).await.expect("connect"));
    }
    // Each connection over the bound closed the oldest one: all but the last `bound` are
    // closed by now.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut closed = 0;
    for stream in &mut flood {
        let mut byte = [0u8; 1];
        let wait = deadline.min(tokio::time::Instant::now() + Duration::from_millis(20));
        if let Ok(Ok(0)) = tokio::time::timeout_at(wait, stream.read(&mut byte)).await {
            closed += 1;
        }
    }
    assert_eq!(
        emu.unauthenticated(),
        bound,
        "the bound is held, not passed"
    );
    assert!(closed >= FLOOD - bound, "{closed} of {FLOOD} closed");
    let held = held_connections(emu.local_addr().port());
    assert_eq!(
        held, bound,
        "the emulator keeps {bound} of the flood's {FLOOD} connections open"
    );

    // A real client gets in while the flood's connections are still held.
    let sb = client_of(&emu, JOBS);
    sb.send(JOBS, job_message("during-flood", &json!({"worker": "w"})))
        .await
        .expect("a real client is not locked out");
    assert_eq!(
        emu.unauthenticated(),
        bound - 1,
        "it pushed out one, then authenticated"
    );

    // Those within the bound are closed once the auth timeout passes without a token.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    assert_eq!(emu.unauthenticated(), 0);
    drop(flood);

    // The real client's connection, authenticated, was never counted or timed out.
    sb.send(JOBS, job_message("after-flood", &json!({"worker": "w"})))
        .await
        .expect("the authenticated connection is untouched");
    assert_eq!(sb.stats.connects.load(Ordering::Relaxed), 1);
    sb.close().await;
    emu.shutdown().await;
}

fn client_of(emu: &hybrid_worker::emulator::EmulatorHandle, entity: &str) -> ServiceBusBroker {
    let cs = ConnectionString::parse(&emu.connection_string()).expect("connection string");
    ServiceBusBroker::new(ServiceBusConfig::from_connection_string(
        &cs,
        entity,
        Duration::from_secs(3600),
    ))
}

#[tokio::test]
async fn a_queue_refuses_sends_past_its_size_quota_until_messages_leave() {
    let mut config = EmulatorConfig::new("127.0.0.1:0".parse().expect("addr"));
    let mut jobs = QueueConfig::new(JOBS);
    jobs.max_size_bytes = 1024 * 1024;
    config.queues = vec![jobs];
    let emu = Emulator::start(config).await.expect("emulator starts");
    let sb = client_of(&emu, JOBS);
    let big = |i: usize| OutgoingMessage {
        message_id: Some(format!("big-{i}")),
        body: vec![b'x'; 250_000],
        ..Default::default()
    };
    for i in 0..4 {
        sb.send(JOBS, big(i)).await.expect("within the quota");
    }
    let refused = sb.send(JOBS, big(4)).await;
    match &refused {
        Err(BrokerError::Refused(why)) => {
            assert!(
                why.contains("ResourceLimitExceeded") && why.contains("maximum entity size"),
                "{why}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        sb.stats.connects.load(Ordering::Relaxed),
        1,
        "only the send failed"
    );
    // Dead letters count too; a completed message frees its space.
    let got = sb
        .receive(2, Duration::from_secs(5))
        .await
        .expect("receive");
    sb.dead_letter(got[0].lock_token, "x", "y")
        .await
        .expect("dead-letter");
    assert!(
        sb.send(JOBS, big(4)).await.is_err(),
        "a dead letter still takes space"
    );
    sb.complete(got[1].lock_token).await.expect("complete");
    sb.send(JOBS, big(4)).await.expect("room again");
    sb.close().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn the_embedded_results_queue_drops_a_resent_reply_as_deployed_ones_do() {
    let emu = Emulator::start(EmulatorConfig::new("127.0.0.1:0".parse().expect("addr")))
        .await
        .expect("emulator starts");
    let sb = client_of(&emu, JOBS);
    let reply = || OutgoingMessage {
        message_id: Some("job-1:result".into()),
        session_id: Some("flow-1".into()),
        body: b"{}".to_vec(),
        ..Default::default()
    };
    sb.send(RESULTS, reply()).await.expect("first");
    sb.send(RESULTS, reply())
        .await
        .expect("a duplicate is accepted and dropped");
    let first = sb
        .receive_session(RESULTS, "flow-1", Duration::from_secs(5))
        .await
        .expect("receive");
    assert!(first.is_some());
    let second = sb
        .receive_session(RESULTS, "flow-1", Duration::from_secs(1))
        .await
        .expect("receive");
    assert!(second.is_none(), "the resent reply was dropped");
    sb.close().await;
    emu.shutdown().await;
}
