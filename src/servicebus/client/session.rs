//! Receiving a session of the jobs queue (`docs/sessions.md`, `docs/servicebus-protocol.md`).
//!
//! Accepting a session is attaching a receiver link whose source filter
//! `com.microsoft:session-filter` is null (next available): the broker locks a session that
//! has messages and answers with its id in that filter, or, when none comes within the
//! `com.microsoft:timeout` the attach asks for, refuses the link with `com.microsoft:timeout`.
//! Its messages are taken one at a time (credit 1), so none waits on the link while a job
//! runs. Renewal (`renew-session-lock`) and settlement (`update-disposition` with the
//! `session-id`, as the Python SDK sends it) go through a management link of the session's
//! own, named after the receive link (`associated-link-name`).
//!
//! Each accept runs on an AMQP session of its own on the shared connection: a refused attach
//! may end the AMQP session it was made on (fe2o3 ends it on the refusal's detach), which must
//! not take the jobs, senders and other sessions' links with it. For the same reason a failure
//! on a session's links ends that one session (its lock is gone with its link, as on Service
//! Bus), not the connection.

use super::*;
use crate::broker::session::SessionReceiver;
use fe2o3_amqp::types::messaging::FilterSet;

const SESSION_FILTER: &str = "com.microsoft:session-filter";
const TIMEOUT_PROPERTY: &str = "com.microsoft:timeout";

/// One session of the jobs queue locked for this daemon.
pub(super) struct ServiceBusSession {
    session_id: String,
    link_name: String,
    amqp: Mutex<SessionHandle<()>>,
    /// `None` once closed.
    receiver: Mutex<Option<Receiver>>,
    mgmt: Mutex<Option<MgmtClient>>,
}

impl ServiceBusBroker {
    /// Accepts the next available session; `None` when the broker found none within `wait`.
    pub(super) async fn accept_next_session(
        &self,
        wait: Duration,
    ) -> Result<Option<ServiceBusSession>, BrokerError> {
        let live = self.live().await?;
        self.authorize(&live, &self.config.jobs_queue).await?;
        let id = Uuid::new_v4();
        let link_name = format!("jobs-session-{id}");
        let mut filter = FilterSet::new();
        filter.insert(Symbol::from(SESSION_FILTER), Value::Null);
        let source = Source::builder()
            .address(self.config.jobs_queue.as_str())
            .filter(filter)
            .build();
        let mut properties = fe2o3_amqp::types::definitions::Fields::new();
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        properties.insert(Symbol::from(TIMEOUT_PROPERTY), Value::Uint(wait_ms));
        let begun = Session::begin(&mut *live.connection.lock().await).await;
        let mut amqp = match begun {
            Ok(amqp) => amqp,
            Err(e) => {
                return Err(self.broken(&live, connection_error("beginning a session", e)));
            }
        };
        let attach = Receiver::builder()
            .name(link_name.clone())
            .source(source)
            .target(format!("receiver-{id}"))
            .properties(properties)
            .verify_incoming_source(false)
            .sender_settle_mode(SenderSettleMode::Unsettled)
            .receiver_settle_mode(ReceiverSettleMode::Second)
            .credit_mode(CreditMode::Manual)
            .auto_accept(false)
            .attach(&mut amqp);
        let attached = tokio::time::timeout(wait + CONNECT_TIMEOUT, attach).await;
        let receiver = match attached {
            Ok(Ok(receiver)) => receiver,
            Ok(Err(ReceiverAttachError::RemoteClosedWithError(e))) if is_not_found(&e) => {
                let _ = amqp.end().await;
                return Err(BrokerError::NotFound(self.config.jobs_queue.clone()));
            }
            Ok(Err(ReceiverAttachError::RemoteClosedWithError(e))) if !is_timeout(&e) => {
                let _ = amqp.end().await;
                return Err(BrokerError::Refused(format!(
                    "accepting a session of {}: {e:?}",
                    self.config.jobs_queue
                )));
            }
            // No session became available: the broker answers the attach with no source and
            // detaches it with `com.microsoft:timeout` (fe2o3 may report the null source, or
            // the AMQP session it ended on the detach, before it reads the reason).
            Ok(Err(
                ReceiverAttachError::RemoteClosedWithError(_)
                | ReceiverAttachError::IncomingSourceIsNone
                | ReceiverAttachError::SessionStopped(_),
            )) => {
                let _ = amqp.end().await;
                return Ok(None);
            }
            Ok(Err(e)) => {
                let _ = amqp.end().await;
                return Err(connection_error("accepting a session", e.to_string()));
            }
            Err(_) => {
                let _ = amqp.end().await;
                return Err(self.broken(
                    &live,
                    BrokerError::Connection("accepting a session timed out".into()),
                ));
            }
        };
        self.held_session(receiver, amqp, link_name, id)
            .await
            .map(Some)
    }

    /// The accepted link with the session's own management link beside it.
    async fn held_session(
        &self,
        receiver: Receiver,
        mut amqp: SessionHandle<()>,
        link_name: String,
        id: Uuid,
    ) -> Result<ServiceBusSession, BrokerError> {
        let Some(session_id) = accepted_session_id(receiver.source()) else {
            let _ = receiver.close().await;
            let _ = amqp.end().await;
            return Err(BrokerError::Refused(
                "the broker accepted a session link without naming the session".into(),
            ));
        };
        let mgmt = MgmtClient::builder()
            .management_node_address(format!("{}/$management", self.config.jobs_queue))
            .client_node_addr(format!("mgmt-{id}"))
            .attach(&mut amqp)
            .await;
        let mgmt = match mgmt {
            Ok(mgmt) => mgmt,
            Err(e) => {
                let _ = receiver.close().await;
                let _ = amqp.end().await;
                return Err(connection_error("attaching to $management", e));
            }
        };
        Ok(ServiceBusSession {
            session_id,
            link_name,
            amqp: Mutex::new(amqp),
            receiver: Mutex::new(Some(receiver)),
            mgmt: Mutex::new(Some(mgmt)),
        })
    }
}

/// Whether a refused attach means that no session became available in time.
fn is_timeout(error: &fe2o3_amqp::types::definitions::Error) -> bool {
    use fe2o3_amqp::types::definitions::ErrorCondition;
    matches!(&error.condition, ErrorCondition::Custom(c) if c.0 == "com.microsoft:timeout")
}

/// The session id the broker wrote into the answering attach's filter.
fn accepted_session_id(source: &Option<Source>) -> Option<String> {
    let value = source
        .as_ref()?
        .filter
        .as_ref()?
        .get(&Symbol::from(SESSION_FILTER))?;
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Described(d) => match &d.value {
            Value::String(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

impl ServiceBusSession {
    async fn call(&self, request: MgmtRequest) -> Result<MgmtResponse, BrokerError> {
        let mut request = request.with("session-id", Value::String(self.session_id.clone()));
        request.associated_link = Some(self.link_name.clone());
        let mut mgmt = self.mgmt.lock().await;
        let Some(mgmt) = mgmt.as_mut() else {
            return Err(BrokerError::LockLost);
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, mgmt.call(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "A session's management request failed; the session is lost.");
                Err(BrokerError::LockLost)
            }
            Err(_) => {
                tracing::warn!("A session's management request timed out; the session is lost.");
                Err(BrokerError::LockLost)
            }
        }
    }

    async fn disposition(
        &self,
        token: Uuid,
        status: &str,
        dead_letter: Option<(&str, &str)>,
        keep: &BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        let request = super::update_disposition(token, status, dead_letter, keep);
        status_result(&self.call(request).await?)
    }
}

#[async_trait]
impl SessionReceiver for ServiceBusSession {
    fn session_id(&self) -> &str {
        &self.session_id
    }

    async fn receive(&self, wait: Duration) -> Result<Option<Delivery>, BrokerError> {
        let mut receiver = self.receiver.lock().await;
        let Some(receiver) = receiver.as_mut() else {
            return Err(BrokerError::LockLost);
        };
        if let Err(e) = receiver.set_credit(1).await {
            tracing::warn!(error = %e, "Granting credit on a session failed; the session is lost.");
            return Err(BrokerError::LockLost);
        }
        let delivery = match tokio::time::timeout(wait, receiver.recv::<Body<Value>>()).await {
            Err(_) => return Ok(None),
            Ok(Ok(delivery)) => delivery,
            // The broker detached the session's link (or its AMQP session or connection went):
            // its lock is gone.
            Ok(Err(e)) => {
                tracing::info!(error = %e, "The session's link ended.");
                return Err(BrokerError::LockLost);
            }
        };
        let tag = delivery.delivery_tag().to_vec();
        match to_delivery(&tag, delivery.message(), DEFAULT_LOCK) {
            Some(d) => Ok(Some(d)),
            None => {
                tracing::error!("A session delivery without a lock token was released.");
                let _ = receiver.release(&delivery).await;
                Ok(None)
            }
        }
    }

    async fn renew(&self) -> Result<tokio::time::Instant, BrokerError> {
        let response = self
            .call(MgmtRequest::new("com.microsoft:renew-session-lock"))
            .await?;
        status_result(&response)?;
        let Some(Value::Timestamp(until)) = response.field("expiration") else {
            return Err(BrokerError::Refused(
                "renew-session-lock answered without an expiration".into(),
            ));
        };
        let until =
            UNIX_EPOCH + Duration::from_millis(u64::try_from(until.milliseconds()).unwrap_or(0));
        let left = until.duration_since(SystemTime::now()).unwrap_or_default();
        Ok(tokio::time::Instant::now() + left)
    }

    async fn complete(&self, lock_token: Uuid) -> Result<(), BrokerError> {
        self.disposition(lock_token, "completed", None, &BTreeMap::new())
            .await
    }

    async fn abandon(&self, lock_token: Uuid) -> Result<(), BrokerError> {
        self.disposition(lock_token, "abandoned", None, &BTreeMap::new())
            .await
    }

    async fn dead_letter_keeping(
        &self,
        lock_token: Uuid,
        reason: &str,
        description: &str,
        keep: &BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        self.disposition(lock_token, "suspended", Some((reason, description)), keep)
            .await
    }

    async fn close(&self) {
        if let Some(mut receiver) = self.receiver.lock().await.take() {
            // Credit still open could bring one more message; it goes back with the session.
            let _ = receiver.set_credit(0).await;
            let _ = receiver.close().await;
        }
        if let Some(mgmt) = self.mgmt.lock().await.take() {
            let _ = mgmt.close().await;
        }
        let _ = self.amqp.lock().await.end().await;
    }
}
