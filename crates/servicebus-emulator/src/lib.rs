#![warn(missing_docs)]
//! A Service Bus emulator: an AMQP 1.0 server that speaks the Service Bus subset the
//! hybrid-worker daemon and Microsoft's SDKs use. The daemon embeds it; the
//! `servicebus-emulator` binary (`main.rs`) runs it alone; the crate's README compares it with
//! Microsoft's emulator. A "§N" in this crate's comments is a section of
//! `docs/servicebus-protocol.md`, the protocol facts the emulator implements.
//!
//! The life of a message, file by file:
//! 1. [`connection`] accepts a socket ([`admission`] bounds those without a token yet);
//!    [`sasl`] runs the preamble; [`frame`] and [`codec`] cut the byte stream into
//!    performatives.
//! 2. [`session`] keeps windows and links ([`link`]); a client first puts a SAS token on
//!    `$cbs` ([`cbs`], [`sas`]).
//! 3. A transfer on a queue link becomes a [`message::MessageParts`], which [`queue`]
//!    numbers, stores ([`store`]) and only then settles as accepted.
//! 4. Receivers with credit get messages under a peek-lock; their dispositions map to broker
//!    outcomes in [`outcome`]; `$management` requests go to [`management`] via [`request`].
//! 5. Queue, topic and subscription definitions come from a `Config.json` ([`entities`]);
//!    subscription rules are in [`filter`]; [`cli`] runs it all.
//!
//! Not supported: TLS and WebSockets (the official emulator has neither), transactions,
//! partitioning, rule actions and the rule-management operations, SQL filters beyond the
//! subset described in [`filter`], forwarding to topics.

pub mod admission;
pub mod cbs;
pub mod cli;
pub mod clock;
pub mod codec;
pub mod connection;
pub mod entities;
pub mod error;
pub mod filter;
pub mod frame;
pub mod jwt;
pub mod link;
pub mod management;
pub mod message;
pub mod outcome;
pub mod queue;
pub mod request;
pub mod sas;
pub mod sasl;
pub mod session;
pub mod signing;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use admission::Admission;
use clock::{Clock, SystemClock};
use entities::{Entities, QueueConfig, TopicConfig};
use error::SbError;
use queue::{Counts, LinkId, Namespace};
use sas::SasRule;
use store::Store;

/// How the emulator is started.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Queues to serve.
    pub queues: Vec<QueueConfig>,
    /// Topics (with subscriptions) to serve.
    pub topics: Vec<TopicConfig>,
    /// Directory of the SQLite store; `None` keeps everything in memory.
    pub data_dir: Option<PathBuf>,
    /// SAS rules tokens may be signed with.
    pub rules: Vec<SasRule>,
    /// Accept Entra ID tokens (`jwt`) after checking audience and expiry only; see `jwt.rs`.
    pub accept_jwt: bool,
    /// Time source for locks, TTL and scheduling; tests pass a [`clock::ManualClock`].
    pub clock: Arc<dyn Clock>,
    /// A connection that has put no valid token on `$cbs` this long after it was accepted is
    /// closed, as Service Bus does (20 s there).
    pub auth_timeout: Duration,
    /// At most this many connections may be open without a valid token at once; a new one
    /// closes the oldest, so that clients that never authenticate can neither exhaust the
    /// process's descriptors nor lock real clients out (see `admission`).
    pub max_unauthenticated: usize,
}

/// Service Bus's time for a connection's first token (docs/servicebus-protocol.md §1.3).
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(20);
/// Default bound on connections without a token.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 64;

impl EmulatorConfig {
    /// The default entities (`jobs`, session-enabled `results`), the official emulator's key,
    /// in memory.
    pub fn new(listen: SocketAddr) -> EmulatorConfig {
        EmulatorConfig {
            listen,
            queues: QueueConfig::defaults(),
            topics: Vec::new(),
            data_dir: None,
            rules: vec![SasRule::default()],
            accept_jwt: false,
            clock: Arc::new(SystemClock),
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
        }
    }
}

impl EmulatorConfig {
    /// The configuration `hybrid-worker run` and `hybrid-worker emulator` build from their
    /// settings: entities from a `Config.json` (or the defaults), durable in `data_dir` (or
    /// in memory when `None`).
    pub fn load(
        listen: SocketAddr,
        entities_file: Option<&std::path::Path>,
        data_dir: Option<PathBuf>,
    ) -> Result<EmulatorConfig, entities::EntitiesError> {
        let entities = match entities_file {
            Some(path) => entities::load(path)?,
            None => Entities::defaults(),
        };
        let mut config = EmulatorConfig::new(listen);
        config.queues = entities.queues;
        config.topics = entities.topics;
        config.data_dir = data_dir;
        Ok(config)
    }
}

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store could not be opened or loaded.
    #[error(transparent)]
    Broker(#[from] SbError),
}

/// State shared by all connections.
#[derive(Debug)]
pub struct Shared {
    /// All queues.
    pub broker: Namespace,
    /// Keys that may sign tokens.
    pub rules: Vec<SasRule>,
    /// Whether `$cbs` takes JWTs.
    pub accept_jwt: bool,
    /// See [`EmulatorConfig::auth_timeout`].
    pub auth_timeout: Duration,
    /// Connections open now that have not put a valid token yet.
    admission: Arc<Admission>,
    next_link: AtomicU64,
}

impl Shared {
    /// Connections open now without a valid token.
    pub fn unauthenticated(&self) -> usize {
        self.admission.count()
    }

    /// A process-unique link id.
    pub fn next_link_id(&self) -> LinkId {
        self.next_link.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Entry point for running the emulator in-process.
#[derive(Debug)]
pub struct Emulator;

impl Emulator {
    /// Opens the store, binds the port and starts serving in the background.
    pub async fn start(config: EmulatorConfig) -> Result<EmulatorHandle, StartError> {
        let store = Store::open(config.data_dir.as_deref()).map_err(SbError::from)?;
        let entities = Entities {
            queues: config.queues,
            topics: config.topics,
        };
        let broker = Namespace::with_entities(entities, store, config.clock.clone())?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            broker,
            rules: config.rules.clone(),
            accept_jwt: config.accept_jwt,
            auth_timeout: config.auth_timeout,
            admission: Admission::new(config.max_unauthenticated),
            next_link: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(
            listener,
            shared.clone(),
            stop.clone(),
            tracker.clone(),
        ));
        let shared_for_handle = shared.clone();
        tracker.spawn(sweep_loop(shared, stop.clone()));
        let key = config.rules.first().cloned().unwrap_or_default();
        Ok(EmulatorHandle {
            addr,
            key,
            shared: shared_for_handle,
            stop,
            tracker,
        })
    }
}

/// A running emulator. Dropping it does not stop it; call [`EmulatorHandle::shutdown`].
#[derive(Debug)]
pub struct EmulatorHandle {
    addr: SocketAddr,
    key: SasRule,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// The connection string of an emulator at `endpoint` (`host:port`) with the SAS rule
/// `key_name` and its `key`, in the official emulator's form (`UseDevelopmentEmulator=true`:
/// plain AMQP to that port), which Microsoft's SDKs accept. The one place it is written.
pub fn connection_string(endpoint: &str, key_name: &str, key: &str) -> String {
    format!(
        "Endpoint=sb://{endpoint};SharedAccessKeyName={key_name};SharedAccessKey={key};UseDevelopmentEmulator=true;"
    )
}

impl EmulatorHandle {
    /// The bound address (the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A connection string the official SDKs accept (`UseDevelopmentEmulator=true`). When
    /// listening on all interfaces it names the loopback address, which clients can reach.
    pub fn connection_string(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        connection_string(&addr.to_string(), &self.key.name, &self.key.key)
    }

    /// Message counts of a queue, subscription (`topic/Subscriptions/name`) or their
    /// dead-letter path; `None` for an unknown or topic path. Lets tests wait until a queue is
    /// drained without a client.
    pub fn counts(&self, path: &str) -> Option<Counts> {
        let broker = &self.shared.broker;
        let e = broker.resolve(path)?;
        broker.counts(&e).ok()
    }

    /// Connections open now that have not put a valid token yet.
    pub fn unauthenticated(&self) -> usize {
        self.shared.unauthenticated()
    }

    /// Closes every connection (AMQP close), stops accepting and waits for all tasks.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let pending = shared.admission.admit();
                let _ = stream.set_nodelay(true);
                tracker.spawn(connection::serve(
                    stream,
                    shared.clone(),
                    stop.clone(),
                    pending,
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "Accept failed; retrying.");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn sweep_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = shared.broker.sweep() {
            tracing::warn!(error = %e, "Periodic queue maintenance failed.");
        }
    }
}
