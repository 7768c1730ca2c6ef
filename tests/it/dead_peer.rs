//! A broker that vanishes without closing the socket (a cut cable, a frozen VM, a dropped NAT
//! entry) is found by the AMQP idle timeout in seconds, not when TCP gives up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hybrid_worker::broker::Broker;
use hybrid_worker::servicebus::client::{ServiceBusBroker, ServiceBusConfig};
use hybrid_worker::servicebus::connection_string::ConnectionString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::helpers::JOBS;

/// Forwards bytes both ways until frozen; then holds both sockets open and silent.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = frozen.wait_for(|f| *f) => break,
        };
        if *frozen.borrow() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Silent from now on, with both sockets held.
    std::future::pending::<()>().await;
    drop((from, to));
}

async fn freezable_proxy(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (freeze, frozen) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, frozen.clone()));
            tokio::spawn(pump(sr, cw, frozen.clone()));
        }
    });
    (addr, freeze)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_dead_broker_is_found_within_the_idle_timeout() {
    let emu = crate::servicebus::emulator(Duration::from_secs(30)).await;
    let (addr, freeze) = freezable_proxy(emu.local_addr()).await;
    let cs = emu.connection_string().replace(
        &emu.local_addr().port().to_string(),
        &addr.port().to_string(),
    );
    let cs = ConnectionString::parse(&cs).expect("cs");
    let sb = Arc::new(ServiceBusBroker::new(
        ServiceBusConfig::from_connection_string(&cs, JOBS, Duration::from_secs(3600)),
    ));
    // Connected, receiving, and quiet for longer than the idle timeout: heartbeats keep it up.
    let quiet = sb.receive(1, Duration::from_secs(12)).await;
    assert!(matches!(quiet, Ok(ref v) if v.is_empty()), "{quiet:?}");
    freeze.send_replace(true);
    let started = Instant::now();
    let dead = sb.receive(1, Duration::from_secs(60)).await;
    let found = started.elapsed();
    assert!(dead.is_err(), "the dead connection is reported: {dead:?}");
    assert!(found < Duration::from_secs(20), "found after {found:?}");
    eprintln!("a silent dead broker was found after {found:?}");
    emu.shutdown().await;
}
