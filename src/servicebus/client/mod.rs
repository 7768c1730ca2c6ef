//! The Service Bus client: one AMQP connection with its CBS authorisation, the jobs queue's
//! peek-lock receiver and management link, and a sender per destination queue; rebuilt with
//! backoff when the connection drops.
//!
//! Settlement (complete, abandon, dead-letter) goes on the receive link that delivered the
//! message while that link lives ([`settle`]), and through the jobs queue's management node by
//! lock token once it is gone: a lock token stays valid across a reconnect, so a job that was
//! running while the connection dropped is still settled once, not redelivered and run twice.
//! Lock renewal always goes through the management node.
//!
//! [`connection`] opens the connection and authorises entities on it; this module keeps the
//! links (senders, the jobs receiver, the management node) and their rebuilding; [`broker`] is
//! the engine's [`Broker`] on them; [`operations`] what the CLI uses besides.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::{
    ErrorRecovery, MessageSizeExceeded, ReceiverAttachError, RecvError, SenderAttachError,
};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, SenderSettleMode};
use fe2o3_amqp::types::messaging::{Body, Message, Outcome, Source};
use fe2o3_amqp::types::primitives::{Symbol, Timestamp, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken as AmqpCbsToken;
use fe2o3_amqp_management::client::MgmtClient;
use fe2o3_amqp_management::error::Error as MgmtError;
use tokio::sync::Mutex;
use uuid::Uuid;

use super::connection_string::{ConnectionString, SasAuth};
use super::credential::{Credential, CredentialError};
use super::management::{MgmtRequest, MgmtResponse};
use super::message::{to_amqp, to_delivery};
use crate::broker::{Broker, BrokerError, Delivery, OutgoingMessage};

mod broker;
mod connection;
mod operations;
mod session;
mod settle;

/// How long connecting, authorising or attaching may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A receive link is replaced after this many deliveries: messages settled through the
/// management node (near their lock's end, dead-letters that keep properties) stay in the
/// link's local unsettled map until the link is closed. Replacing it sends the jobs still
/// running on it to the management node for their settlement (`settle`).
const RECEIVER_RECYCLE: u64 = 2_000;
/// Lock duration assumed when a delivery does not say when its lock ends.
const DEFAULT_LOCK: Duration = Duration::from_secs(30);
/// Silence after which the connection counts as dead. The Open advertises half of it, so the
/// broker sends an empty frame at least every 5 s while it has nothing to say (Service Bus
/// and the emulator do), and a peer that vanished without closing the socket is found in
/// 10 s instead of when TCP gives up.
const IDLE_TIMEOUT_MS: u32 = 10_000;
/// Extra time given to a receive call to collect more messages after the first.
const GATHER: Duration = Duration::from_millis(3);

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ServiceBusConfig {
    /// `amqps://host:5671` or, for an emulator, `amqp://host:port`.
    pub url: String,
    /// The host name sent in Open and SASL.
    pub hostname: String,
    /// `sb://<authority>`; an entity's token audience is this plus `/<entity>`.
    pub audience_base: String,
    pub credential: Credential,
    /// The queue jobs are received from and settled on.
    pub jobs_queue: String,
}

impl ServiceBusConfig {
    /// From a connection string (SAS key or signature).
    pub fn from_connection_string(
        cs: &ConnectionString,
        jobs_queue: &str,
        token_lifetime: Duration,
    ) -> Self {
        let credential = match &cs.auth {
            SasAuth::Key { name, key } => Credential::SasKey {
                name: name.clone(),
                key: key.clone(),
                lifetime: token_lifetime,
            },
            SasAuth::Signature(token) => Credential::SasToken(token.clone()),
        };
        Self {
            url: cs.amqp_url(),
            hostname: cs.host.clone(),
            audience_base: format!("sb://{}", cs.audience_authority()),
            credential,
            jobs_queue: jobs_queue.to_owned(),
        }
    }

    /// For a namespace reached with an Entra ID credential, over TLS.
    pub fn for_namespace(namespace: &str, credential: Credential, jobs_queue: &str) -> Self {
        Self {
            url: format!("amqps://{namespace}:5671"),
            hostname: namespace.to_owned(),
            audience_base: format!("sb://{namespace}"),
            credential,
            jobs_queue: jobs_queue.to_owned(),
        }
    }
}

/// One AMQP connection and what hangs on it.
struct Live {
    generation: u64,
    connection: Mutex<ConnectionHandle<()>>,
    session: Mutex<SessionHandle<()>>,
    cbs: Mutex<CbsClient>,
    /// Audience → (when the token was put, when it expires).
    tokens: Mutex<HashMap<String, (SystemTime, SystemTime)>>,
    broken: AtomicBool,
}

struct ReceiverLink {
    generation: u64,
    /// Unique per attach: a delivery settles on its link only while this one is open.
    serial: u64,
    receiver: Receiver,
    delivered: u64,
}

/// Counters the daemon reports.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub connects: AtomicU64,
    pub token_puts: AtomicU64,
    /// Settlements sent on the receive link that delivered the message.
    pub settled_on_link: AtomicU64,
    /// Settlements through the management node by lock token (the link was gone, or a
    /// dead-letter kept properties).
    pub settled_by_token: AtomicU64,
}

/// A [`Broker`] on Azure Service Bus (or the emulator), over AMQP 1.0.
pub struct ServiceBusBroker {
    config: ServiceBusConfig,
    live: Mutex<Option<Arc<Live>>>,
    receiver: Mutex<Option<ReceiverLink>>,
    /// Asks a waiting receive to return, so that a settlement can use the receiver.
    receiver_wanted: tokio::sync::Notify,
    /// The deliveries that can be settled on their link.
    deliveries: settle::LinkDeliveries,
    receiver_serial: AtomicU64,
    mgmt: Mutex<Option<(u64, MgmtClient)>>,
    senders: Mutex<HashMap<String, (u64, Sender)>>,
    generation: AtomicU64,
    /// Messages asked for per peek; halved when a response does not fit (see `peek_page`).
    pub(super) peek_count: AtomicI32,
    pub stats: ClientStats,
}

impl std::fmt::Debug for ServiceBusBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBusBroker")
            .field("url", &self.config.url)
            .field("jobs_queue", &self.config.jobs_queue)
            .finish_non_exhaustive()
    }
}

fn connection_error(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Connection(format!("{what}: {e}"))
}

impl ServiceBusBroker {
    pub fn new(config: ServiceBusConfig) -> Self {
        Self {
            config,
            live: Mutex::new(None),
            receiver: Mutex::new(None),
            receiver_wanted: tokio::sync::Notify::new(),
            deliveries: settle::LinkDeliveries::default(),
            receiver_serial: AtomicU64::new(0),
            mgmt: Mutex::new(None),
            senders: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            peek_count: AtomicI32::new(super::peek::PEEK_PAGE),
            stats: ClientStats::default(),
        }
    }

    /// Connects now, so that a wrong address or key fails at start rather than at the first
    /// job.
    pub async fn connect(&self) -> Result<(), BrokerError> {
        let live = self.live().await?;
        self.authorize(&live, &self.config.jobs_queue).await
    }

    /// The current connection, or a new one.
    async fn live(&self) -> Result<Arc<Live>, BrokerError> {
        let mut slot = self.live.lock().await;
        if let Some(live) = slot.as_ref().filter(|l| !l.broken.load(Ordering::SeqCst)) {
            return Ok(live.clone());
        }
        if let Some(old) = slot.take() {
            tracing::warn!(
                generation = old.generation,
                "The Service Bus connection was lost; reconnecting."
            );
        }
        let live = tokio::time::timeout(CONNECT_TIMEOUT, self.open())
            .await
            .map_err(|_| {
                BrokerError::Connection(format!("connecting to {} timed out", self.config.url))
            })??;
        let live = Arc::new(live);
        *slot = Some(live.clone());
        Ok(live)
    }

    /// Marks the connection as broken (the next call reconnects) and returns the error.
    fn broken(&self, live: &Live, error: BrokerError) -> BrokerError {
        if error.is_transient() {
            live.broken.store(true, Ordering::SeqCst);
        }
        error
    }

    /// Calls the jobs queue's management node; the caller maps the status.
    pub(super) async fn management(
        &self,
        request: MgmtRequest,
    ) -> Result<MgmtResponse, BrokerError> {
        self.management_sized(request).await?.map_err(|too_large| {
            BrokerError::Refused(format!(
                "the management response is larger than its link allows ({too_large})"
            ))
        })
    }

    /// [`management`](Self::management), telling a response over the link's size limit apart
    /// (the inner error): only that link was detached, and a smaller request may fit.
    pub(super) async fn management_sized(
        &self,
        request: MgmtRequest,
    ) -> Result<Result<MgmtResponse, MessageSizeExceeded>, BrokerError> {
        let live = self.live().await?;
        self.authorize(&live, &self.config.jobs_queue).await?;
        let mut slot = self.mgmt.lock().await;
        if slot
            .as_ref()
            .is_none_or(|(generation, _)| *generation != live.generation)
        {
            let client = MgmtClient::builder()
                .management_node_address(format!("{}/$management", self.config.jobs_queue))
                .client_node_addr(format!("mgmt-{}", Uuid::new_v4()))
                .attach(&mut *live.session.lock().await)
                .await
                .map_err(|e| self.broken(&live, connection_error("attaching to $management", e)))?;
            *slot = Some((live.generation, client));
        }
        let Some((_, client)) = slot.as_mut() else {
            return Err(BrokerError::Connection("no management link".into()));
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, client.call(request)).await {
            Ok(Ok(response)) => Ok(Ok(response)),
            Ok(Err(MgmtError::Recv(RecvError::MessageSizeExceeded(too_large)))) => {
                // The receiving link was detached; the connection is fine.
                *slot = None;
                Ok(Err(too_large))
            }
            Ok(Err(e)) => {
                *slot = None;
                Err(self.broken(&live, connection_error("a management request failed", e)))
            }
            Err(_) => {
                *slot = None;
                Err(self.broken(
                    &live,
                    BrokerError::Connection("a management request timed out".into()),
                ))
            }
        }
    }

    /// A management call retried with backoff and jitter while the connection is being
    /// rebuilt (a lock token survives a reconnect).
    async fn management_retried(&self, request: MgmtRequest) -> Result<MgmtResponse, BrokerError> {
        retried(|| self.management(request.clone())).await
    }

    async fn update_disposition(
        &self,
        token: Uuid,
        status: &str,
        dead_letter: Option<(&str, &str)>,
        keep: &BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        self.deliveries.forget(token);
        let request = update_disposition(token, status, dead_letter, keep);
        let response = self.management_retried(request).await?;
        status_result(&response)?;
        self.stats.settled_by_token.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn send_at(
        &self,
        queue: &str,
        message: &Message<Body<Value>>,
    ) -> Result<(), BrokerError> {
        let live = self.live().await?;
        self.authorize(&live, queue).await?;
        let mut senders = self.senders.lock().await;
        if senders
            .get(queue)
            .is_none_or(|(generation, _)| *generation != live.generation)
        {
            let mut session = live.session.lock().await;
            let attach = Sender::builder()
                .name(format!("sender-{queue}-{}", Uuid::new_v4()))
                .target(queue)
                .sender_settle_mode(SenderSettleMode::Unsettled)
                .attach(&mut session);
            let attached = tokio::time::timeout(CONNECT_TIMEOUT, attach).await;
            drop(session);
            let sender = match attached {
                Ok(Ok(sender)) => sender,
                // The session (and so the connection) is gone: rebuild it.
                Ok(Err(
                    e
                    @ (SenderAttachError::SessionStopped(_) | SenderAttachError::SessionNotMapped),
                )) => {
                    return Err(self.broken(
                        &live,
                        connection_error(&format!("attaching a sender to {queue}"), e),
                    ));
                }
                // The broker refused this one link (unknown or forbidden entity): the
                // connection and every other link are fine.
                Ok(Err(SenderAttachError::RemoteClosedWithError(e))) => {
                    if is_not_found(&e) {
                        return Err(BrokerError::NotFound(queue.to_owned()));
                    }
                    return Err(BrokerError::Refused(format!(
                        "attaching a sender to {queue}: {e:?}"
                    )));
                }
                // The link's own handshake went wrong: the session's state is in doubt, so
                // the connection is rebuilt.
                Ok(Err(e)) => {
                    return Err(self.broken(
                        &live,
                        connection_error(&format!("attaching a sender to {queue}"), e),
                    ));
                }
                Err(_) => {
                    return Err(self.broken(
                        &live,
                        BrokerError::Connection(format!("attaching a sender to {queue} timed out")),
                    ));
                }
            };
            senders.insert(queue.to_owned(), (live.generation, sender));
        }
        let Some((_, sender)) = senders.get_mut(queue) else {
            return Err(BrokerError::Connection("no sender".into()));
        };
        let outcome = tokio::time::timeout(CONNECT_TIMEOUT, sender.send(message.clone())).await;
        match outcome {
            Ok(Ok(Outcome::Accepted(_))) => Ok(()),
            Ok(Ok(Outcome::Rejected(rejected))) => Err(BrokerError::Refused(
                rejected
                    .error
                    .map(|e| format!("{:?}: {}", e.condition, e.description.unwrap_or_default()))
                    .unwrap_or_else(|| "rejected".into()),
            )),
            Ok(Ok(other)) => Err(BrokerError::Refused(format!(
                "the broker answered {other:?}"
            ))),
            Ok(Err(e)) => match e.recovery() {
                // Over the link's size limit, or not encodable: nothing was sent, the link is fine.
                ErrorRecovery::UseLink => {
                    Err(BrokerError::Refused(format!("sending to {queue}: {e}")))
                }
                // The broker detached this link (with its reason): only the link is replaced.
                ErrorRecovery::ReattachLink | ErrorRecovery::NewLink => {
                    senders.remove(queue);
                    Err(BrokerError::Refused(format!("sending to {queue}: {e}")))
                }
                // The session or connection is gone (or a future kind of failure): rebuild.
                _ => {
                    senders.remove(queue);
                    Err(self.broken(&live, connection_error(&format!("sending to {queue}"), e)))
                }
            },
            Err(_) => {
                senders.remove(queue);
                Err(self.broken(
                    &live,
                    BrokerError::Connection(format!("sending to {queue} timed out")),
                ))
            }
        }
    }

    /// A send retried with backoff and jitter across a reconnect. A send whose outcome was lost
    /// with the connection may go twice; replies and retry copies carry deterministic
    /// MessageIds, so duplicate detection drops the second.
    async fn send_retried(
        &self,
        queue: &str,
        message: &Message<Body<Value>>,
    ) -> Result<(), BrokerError> {
        (|| self.send_at(queue, message))
            .retry(
                ExponentialBuilder::default()
                    .with_max_times(3)
                    .with_jitter(),
            )
            .when(BrokerError::is_transient)
            .await
    }

    async fn attach_receiver(&self, live: &Live) -> Result<Receiver, BrokerError> {
        let id = Uuid::new_v4();
        let mut session = live.session.lock().await;
        let attach = Receiver::builder()
            .name(format!("jobs-receiver-{id}"))
            .source(self.config.jobs_queue.as_str())
            .target(format!("receiver-{id}"))
            .sender_settle_mode(SenderSettleMode::Unsettled)
            .receiver_settle_mode(ReceiverSettleMode::Second)
            .credit_mode(CreditMode::Manual)
            .auto_accept(false)
            .attach(&mut session);
        let attached = tokio::time::timeout(CONNECT_TIMEOUT, attach).await;
        drop(session);
        match attached {
            Ok(Ok(receiver)) => Ok(receiver),
            Ok(Err(ReceiverAttachError::RemoteClosedWithError(e))) if is_not_found(&e) => {
                Err(BrokerError::NotFound(self.config.jobs_queue.clone()))
            }
            Ok(Err(e)) => Err(self.broken(
                live,
                connection_error("attaching the jobs receiver", e.to_string()),
            )),
            Err(_) => Err(self.broken(
                live,
                BrokerError::Connection("attaching the jobs receiver timed out".into()),
            )),
        }
    }

    /// Closes the connection politely (links, session, connection).
    pub async fn close(&self) {
        self.receiver.lock().await.take();
        self.deliveries.clear();
        self.mgmt.lock().await.take();
        self.senders.lock().await.clear();
        if let Some(live) = self.live.lock().await.take() {
            let _ = live.session.lock().await.end().await;
            let _ = live.connection.lock().await.close().await;
        }
    }
}

/// Retries `call` with backoff and jitter while its error is transient.
pub(super) async fn retried<T, F, Fut>(call: F) -> Result<T, BrokerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BrokerError>>,
{
    call.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(3))
            .with_max_times(5)
            .with_jitter(),
    )
    .when(BrokerError::is_transient)
    .notify(|e, after| tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64, "Retrying a management request."))
    .await
}

fn lock_tokens(token: Uuid) -> Value {
    Value::Array(
        vec![Value::Uuid(fe2o3_amqp::types::primitives::Uuid::from(
            *token.as_bytes(),
        ))]
        .into(),
    )
}

pub(super) fn status_result(response: &MgmtResponse) -> Result<(), BrokerError> {
    if response.status == 200 {
        return Ok(());
    }
    if response.is_lock_lost() {
        return Err(BrokerError::LockLost);
    }
    Err(BrokerError::Refused(format!(
        "status {} {}: {}",
        response.status,
        response.condition.as_deref().unwrap_or(""),
        response.description.as_deref().unwrap_or("")
    )))
}

/// Whether the broker refused a link because its entity does not exist (`amqp:not-found`).
fn is_not_found(error: &fe2o3_amqp::types::definitions::Error) -> bool {
    use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition};
    matches!(
        error.condition,
        ErrorCondition::AmqpError(AmqpError::NotFound)
    )
}

/// The `update-disposition` request that settles one message by its lock token (§5): its new
/// status, a dead letter's reason and description, and the properties to merge into it.
fn update_disposition(
    token: Uuid,
    status: &str,
    dead_letter: Option<(&str, &str)>,
    keep: &BTreeMap<String, String>,
) -> MgmtRequest {
    let mut request = MgmtRequest::new("com.microsoft:update-disposition")
        .with("disposition-status", Value::String(status.to_owned()))
        .with("lock-tokens", lock_tokens(token));
    if let Some((reason, description)) = dead_letter {
        request = request
            .with("deadletter-reason", Value::String(reason.to_owned()))
            .with(
                "deadletter-description",
                Value::String(description.to_owned()),
            );
    }
    if !keep.is_empty() {
        let map = keep
            .iter()
            .map(|(k, v)| (Value::String(k.clone()), Value::String(v.clone())))
            .collect();
        request = request.with("properties-to-modify", Value::Map(map));
    }
    request
}
