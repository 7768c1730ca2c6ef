//! The Service Bus client against the embedded emulator started in-process on 127.0.0.1:0:
//! the production path is the tested path.

use std::sync::Arc;
use std::time::Duration;

use hybrid_worker::broker::{Broker, BrokerError, OutgoingMessage};
use hybrid_worker::emulator::clock::{Clock, ManualClock, SystemClock};
use hybrid_worker::emulator::entities::QueueConfig;
use hybrid_worker::emulator::queue::Counts;
use hybrid_worker::emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use hybrid_worker::servicebus::client::{ServiceBusBroker, ServiceBusConfig};
use hybrid_worker::servicebus::connection_string::ConnectionString;
use serde_json::json;

use crate::helpers::*;

/// An emulator with `jobs` (the given lock duration) and a session-enabled `results` queue.
pub async fn emulator(lock: Duration) -> EmulatorHandle {
    emulator_on(lock, Arc::new(SystemClock)).await
}

/// The same on a clock the test moves, for lock expiry without sleeping.
async fn emulator_on(lock: Duration, clock: Arc<dyn Clock>) -> EmulatorHandle {
    let mut config = EmulatorConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.clock = clock;
    let mut jobs = QueueConfig::new(JOBS);
    jobs.lock_duration = lock;
    let mut results = QueueConfig::new(RESULTS);
    results.requires_session = true;
    config.queues = vec![jobs, results];
    Emulator::start(config).await.expect("emulator starts")
}

pub fn client(emulator: &EmulatorHandle, token_lifetime: Duration) -> ServiceBusBroker {
    let cs = ConnectionString::parse(&emulator.connection_string()).expect("connection string");
    ServiceBusBroker::new(ServiceBusConfig::from_connection_string(
        &cs,
        JOBS,
        token_lifetime,
    ))
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn send_receive_renew_and_settle_through_the_emulator() {
    let emu = emulator(Duration::from_secs(5)).await;
    let sb = client(&emu, HOUR);
    sb.connect().await.expect("connects");
    for id in ["a", "b", "c"] {
        sb.send(JOBS, job_message(id, &json!({"worker": "w"})))
            .await
            .expect("send");
    }
    let got = sb
        .receive(2, Duration::from_secs(5))
        .await
        .expect("receive");
    assert_eq!(got.len(), 2, "never more than the credit asked for");
    let first = &got[0];
    assert_eq!(first.properties.message_id.as_deref(), Some("a"));
    assert_eq!(
        first.properties.reply_to_session_id.as_deref(),
        Some("session-a")
    );
    assert!(first.properties.sequence_number.is_some());
    assert_eq!(first.delivery_count, 0);
    let until = sb.renew_lock(first.lock_token).await.expect("renew");
    assert!(until > tokio::time::Instant::now() + Duration::from_secs(3));
    sb.complete(first.lock_token).await.expect("complete");
    assert_eq!(
        sb.complete(first.lock_token).await,
        Err(BrokerError::LockLost),
        "settled once only"
    );
    sb.dead_letter(got[1].lock_token, "InvalidInput", "bad")
        .await
        .expect("dead-letter");
    let third = sb
        .receive(5, Duration::from_secs(5))
        .await
        .expect("receive");
    assert_eq!(third.len(), 1);
    sb.abandon(third[0].lock_token).await.expect("abandon");
    let again = sb
        .receive(5, Duration::from_secs(5))
        .await
        .expect("receive");
    assert_eq!(again[0].properties.message_id.as_deref(), Some("c"));
    assert_eq!(again[0].delivery_count, 1, "abandon counts a delivery");
    sb.complete(again[0].lock_token).await.expect("complete");
    sb.close().await;
    emu.shutdown().await;
}

/// Complete, abandon and dead-letter go on the receive link that delivered the message (one
/// disposition each, no management round trip); once that link is gone, by lock token.
#[tokio::test]
async fn settlements_go_on_the_delivering_link_and_by_token_once_it_is_gone() {
    use std::sync::atomic::Ordering::Relaxed;
    let emu = emulator(Duration::from_secs(30)).await;
    let sb = client(&emu, HOUR);
    for id in ["a", "b", "c", "d"] {
        sb.send(JOBS, job_message(id, &json!({})))
            .await
            .expect("send");
    }
    let got = sb
        .receive(4, Duration::from_secs(5))
        .await
        .expect("receive");
    assert_eq!(got.len(), 4);
    sb.complete(got[0].lock_token).await.expect("complete");
    sb.abandon(got[1].lock_token).await.expect("abandon");
    sb.dead_letter(got[2].lock_token, "InvalidInput", "the input was bad")
        .await
        .expect("dead-letter");
    assert_eq!(sb.stats.settled_on_link.load(Relaxed), 3);
    assert_eq!(sb.stats.settled_by_token.load(Relaxed), 0);
    let expected = Counts {
        active: 1,
        locked: 1,
        dead_lettered: 1,
        ..Default::default()
    };
    wait_for(Duration::from_secs(5), "the dispositions to land", || {
        emu.counts(JOBS) == Some(expected)
    })
    .await;
    let cs = ConnectionString::parse(&emu.connection_string()).expect("cs");
    let dlq = ServiceBusBroker::new(ServiceBusConfig::from_connection_string(
        &cs,
        &format!("{JOBS}/$DeadLetterQueue"),
        HOUR,
    ));
    let dead = dlq.peek(1, 10).await.expect("peek");
    assert_eq!(dead.len(), 1);
    let app = &dead[0].properties.application;
    assert_eq!(
        app.get("DeadLetterReason").map(String::as_str),
        Some("InvalidInput")
    );
    assert_eq!(
        app.get("DeadLetterErrorDescription").map(String::as_str),
        Some("the input was bad")
    );
    dlq.close().await;

    // The link is gone with the connection: the lock token still settles.
    sb.close().await;
    sb.complete(got[3].lock_token)
        .await
        .expect("complete by token");
    assert_eq!(sb.stats.settled_by_token.load(Relaxed), 1);
    let again = sb
        .receive(1, Duration::from_secs(5))
        .await
        .expect("receive");
    assert_eq!(again[0].properties.message_id.as_deref(), Some("b"));
    assert_eq!(
        again[0].delivery_count, 1,
        "an abandon on the link counts a delivery"
    );
    sb.complete(again[0].lock_token).await.expect("complete");
    assert_eq!(sb.stats.settled_on_link.load(Relaxed), 4);
    wait_for(Duration::from_secs(5), "the queue to empty", || {
        emu.counts(JOBS)
            == Some(Counts {
                dead_lettered: 1,
                ..Default::default()
            })
    })
    .await;
    sb.close().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn an_expired_lock_is_reported_as_lost() {
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    let emu = emulator_on(Duration::from_secs(1), clock.clone()).await;
    let sb = client(&emu, HOUR);
    sb.send(JOBS, job_message("x", &json!({})))
        .await
        .expect("send");
    let got = sb
        .receive(1, Duration::from_secs(5))
        .await
        .expect("receive");
    // Renewing inside the lock works; past it, neither renewal nor settlement does.
    clock.advance(900);
    sb.renew_lock(got[0].lock_token).await.expect("renew");
    clock.advance(1001);
    assert_eq!(
        sb.renew_lock(got[0].lock_token).await,
        Err(BrokerError::LockLost)
    );
    assert_eq!(
        sb.complete(got[0].lock_token).await,
        Err(BrokerError::LockLost)
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn unknown_queues_and_wrong_keys_are_refused() {
    let emu = emulator(Duration::from_secs(30)).await;
    let sb = client(&emu, HOUR);
    let err = sb
        .send("no-such-queue", OutgoingMessage::default())
        .await
        .expect_err("unknown");
    assert!(matches!(err, BrokerError::NotFound(_)), "{err:?}");
    // The same refusal on the receiving side: a jobs queue that does not exist.
    let cs = ConnectionString::parse(&emu.connection_string()).expect("cs");
    let lost = ServiceBusBroker::new(ServiceBusConfig::from_connection_string(
        &cs,
        "no-such-jobs",
        HOUR,
    ));
    let err = lost
        .receive(1, Duration::from_millis(200))
        .await
        .expect_err("unknown jobs queue");
    assert!(matches!(err, BrokerError::NotFound(_)), "{err:?}");
    let wrong = emu.connection_string().replace("SAS_KEY_VALUE", "WRONG");
    let cs = ConnectionString::parse(&wrong).expect("cs");
    let bad = ServiceBusBroker::new(ServiceBusConfig::from_connection_string(&cs, JOBS, HOUR));
    let err = bad.connect().await.expect_err("wrong key");
    assert!(matches!(err, BrokerError::Refused(_)), "{err:?}");
    emu.shutdown().await;
}

#[tokio::test]
async fn the_engine_runs_jobs_over_service_bus() {
    let emu = emulator(Duration::from_secs(2)).await;
    let sb = Arc::new(client(&emu, HOUR));
    let exec = Arc::new(ScriptedExecutor::default());
    // One job outlives the lock duration twice over: it must be renewed, not redelivered.
    sb.send(
        JOBS,
        job_message(
            "slow",
            &json!({"worker": "scripted", "input": {"ms": 5000}}),
        ),
    )
    .await
    .expect("send");
    sb.send(
        JOBS,
        job_message(
            "bad",
            &json!({"worker": "scripted", "input": {"result": "invalid"}}),
        ),
    )
    .await
    .expect("send");
    let engine = hybrid_worker::engine::Engine::new(sb.clone(), exec.clone(), options(2));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { engine.run(stop).await });

    let reader = client(&emu, HOUR);
    let mut answered = Vec::new();
    for session in ["session-slow", "session-bad"] {
        let reply = reader
            .receive_session(RESULTS, session, Duration::from_secs(20))
            .await
            .expect("reply")
            .expect("a reply in time");
        answered.push(reply);
    }
    shutdown.cancel();
    task.await.expect("engine");
    assert_eq!(
        exec.started().len(),
        2,
        "each job ran once: {:?}",
        exec.started()
    );
    let slow: serde_json::Value = serde_json::from_slice(&answered[0].body).expect("json");
    assert_eq!(slow["status"], "succeeded");
    let bad: serde_json::Value = serde_json::from_slice(&answered[1].body).expect("json");
    assert_eq!(bad["error"]["kind"], "InvalidInput");
    emu.shutdown().await;
}

/// A TCP proxy on 127.0.0.1 in front of the emulator whose connections the test can cut, to
/// drop the client's connection without touching the broker.
struct CuttableProxy {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
}

impl CuttableProxy {
    async fn start(upstream: std::net::SocketAddr) -> CuttableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let cuts = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        CuttableProxy { addr, cut }
    }

    /// Drops every connection open now.
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

#[tokio::test]
async fn a_dropped_connection_is_rebuilt_and_the_running_job_settles_once() {
    let emu = emulator(Duration::from_secs(4)).await;
    let proxy = CuttableProxy::start(emu.local_addr()).await;
    let cs = emu.connection_string().replace(
        &emu.local_addr().port().to_string(),
        &proxy.addr.port().to_string(),
    );
    let cs = ConnectionString::parse(&cs).expect("cs");
    let sb = Arc::new(ServiceBusBroker::new(
        ServiceBusConfig::from_connection_string(&cs, JOBS, HOUR),
    ));
    let exec = Arc::new(ScriptedExecutor::default());
    sb.send(
        JOBS,
        job_message(
            "survivor",
            &json!({"worker": "scripted", "input": {"ms": 6000}}),
        ),
    )
    .await
    .expect("send");
    let engine = hybrid_worker::engine::Engine::new(sb.clone(), exec.clone(), options(1));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { engine.run(stop).await });
    wait_for(Duration::from_secs(20), "the job to start", || {
        exec.started().len() == 1
    })
    .await;
    proxy.cut();
    let reader = client(&emu, HOUR);
    let reply = reader
        .receive_session(RESULTS, "session-survivor", Duration::from_secs(30))
        .await
        .expect("reply")
        .expect("a reply in time");
    let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("json");
    assert_eq!(body["status"], "succeeded");
    // Completed, not merely answered: nothing is left in the queue to come back.
    wait_for(
        Duration::from_secs(10),
        "the job message to be completed",
        || emu.counts(JOBS) == Some(Counts::default()),
    )
    .await;
    shutdown.cancel();
    task.await.expect("engine");
    assert_eq!(
        exec.started().len(),
        1,
        "ran once across the reconnect: {:?}",
        exec.started()
    );
    assert!(
        sb.stats.connects.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "reconnected"
    );
    assert!(
        reader
            .receive_session(RESULTS, "session-survivor", Duration::from_secs(2))
            .await
            .expect("rx")
            .is_none(),
        "exactly one reply"
    );
    emu.shutdown().await;
}

/// An Entra ID credential whose tokens live three seconds, counting how often it is asked.
#[derive(Debug, Default)]
struct ShortLivedJwt {
    issued: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for ShortLivedJwt {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        use base64::Engine;
        assert_eq!(scopes, ["https://servicebus.azure.net//.default"]);
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let expires =
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::seconds(3);
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let jwt = format!(
            "{}.{}.sig",
            b64(json!({"alg": "none", "typ": "JWT"})),
            b64(json!({"aud": "https://servicebus.azure.net", "exp": expires.unix_timestamp()}))
        );
        Ok(azure_core::credentials::AccessToken::new(jwt, expires))
    }
}

#[tokio::test]
async fn entra_tokens_are_refreshed_before_they_expire() {
    let mut config = EmulatorConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.accept_jwt = true;
    let mut results = QueueConfig::new(RESULTS);
    results.requires_session = true;
    config.queues = vec![QueueConfig::new(JOBS), results];
    let emu = Emulator::start(config).await.expect("emulator");
    let addr = emu.local_addr();
    let credential = Arc::new(ShortLivedJwt::default());
    let mut sb_config = ServiceBusConfig::for_namespace(
        "127.0.0.1",
        hybrid_worker::servicebus::credential::Credential::Entra(credential.clone()),
        JOBS,
    );
    sb_config.url = format!("amqp://{addr}");
    sb_config.audience_base = format!("sb://{addr}");
    let sb = Arc::new(ServiceBusBroker::new(sb_config));
    let exec = Arc::new(ScriptedExecutor::default());
    let engine = hybrid_worker::engine::Engine::new(sb.clone(), exec.clone(), options(1));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { engine.run(stop).await });
    let reader = client(&emu, HOUR);
    // Ten seconds of work against three-second tokens.
    for i in 0..5 {
        let session = format!("session-jwt-{i}");
        let mut msg = job_message(
            &format!("jwt-{i}"),
            &json!({"worker": "scripted", "input": {"ms": 10}}),
        );
        msg.reply_to_session_id = Some(session.clone());
        reader.send(JOBS, msg).await.expect("send");
        let reply = reader
            .receive_session(RESULTS, &session, Duration::from_secs(20))
            .await
            .expect("rx");
        assert!(reply.is_some(), "job {i} answered");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    shutdown.cancel();
    task.await.expect("engine");
    let issued = credential.issued.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        issued >= 4,
        "a fresh token was asked for only {issued} times"
    );
    emu.shutdown().await;
}
