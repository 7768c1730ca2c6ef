//! What the embedded emulator holds for clients that never authenticate: a bounded number of
//! connections, each for a bounded time, so a flood of them on loopback neither exhausts the
//! process's descriptors nor keeps real clients out for long.

use std::time::Duration;

use hybrid_worker::broker::Broker;
use hybrid_worker::emulator::{Emulator, EmulatorConfig};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::helpers::{JOBS, job_message};

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_that_never_authenticate_is_bounded_in_number_and_time() {
    let mut config = EmulatorConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.auth_timeout = Duration::from_secs(4);
    let bound = config.max_unauthenticated;
    let emu = Emulator::start(config).await.expect("emulator starts");
    let before = open_descriptors();

    const FLOOD: usize = 1100;
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(TcpStream::connect(emu.local_addr()).await.expect("connect"));
    }
    // Every connection over the bound is closed as soon as it is accepted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut closed = 0;
    for stream in &mut flood {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(20)),
            stream.read(&mut byte),
        )
        .await
        {
            closed += 1;
        }
    }
    assert_eq!(
        emu.unauthenticated(),
        bound,
        "the bound is held, not passed"
    );
    assert!(
        closed >= FLOOD - bound,
        "{closed} of {FLOOD} closed at once"
    );
    let held = open_descriptors() - before;
    assert!(
        held <= FLOOD + bound + 16,
        "the emulator keeps at most {bound} of the flood's descriptors: {held} open for {FLOOD} clients"
    );

    // Those within the bound are closed once the auth timeout passes without a token.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    assert_eq!(emu.unauthenticated(), 0);
    drop(flood);

    // And a client that authenticates is served.
    let cs = hybrid_worker::servicebus::connection_string::ConnectionString::parse(
        &emu.connection_string(),
    )
    .expect("connection string");
    let sb = hybrid_worker::servicebus::client::ServiceBusBroker::new(
        hybrid_worker::servicebus::client::ServiceBusConfig::from_connection_string(
            &cs,
            JOBS,
            Duration::from_secs(3600),
        ),
    );
    sb.send(JOBS, job_message("after-flood", &json!({"worker": "w"})))
        .await
        .expect("a real client sends after the flood");
    assert_eq!(
        emu.unauthenticated(),
        0,
        "an authenticated connection is not counted"
    );
    sb.close().await;
    emu.shutdown().await;
}
