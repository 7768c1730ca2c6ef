//! The narrow broker interface the engine needs, so that Service Bus, the embedded emulator and
//! the in-memory test broker are interchangeable.
//!
//! Receive and settle act on the jobs queue the broker was opened for; send and schedule name
//! their queue, because replies go wherever a job's `ReplyTo` points.

pub mod memory;
pub mod session;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use uuid::Uuid;

use crate::job::MessageProperties;

/// A message received with peek-lock: it stays on the queue, invisible to others, until it is
/// settled or its lock runs out.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Names the lock in every settlement and renewal.
    pub lock_token: Uuid,
    pub body: Vec<u8>,
    pub properties: MessageProperties,
    /// Earlier failed deliveries (0 on the first).
    pub delivery_count: u32,
    /// When the lock runs out, on the runtime's clock (so tests can pause time).
    pub locked_until: tokio::time::Instant,
    pub enqueued_at: Option<SystemTime>,
}

/// A message to send.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutgoingMessage {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub session_id: Option<String>,
    pub reply_to: Option<String>,
    pub reply_to_session_id: Option<String>,
    pub content_type: Option<String>,
    pub application: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// What can go wrong talking to a broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The lock expired or was taken away: the message will be (or was) delivered again, so
    /// whoever held it must not settle it.
    #[error("the message lock was lost")]
    LockLost,
    #[error("the entity {0:?} does not exist")]
    NotFound(String),
    #[error("the broker refused the request: {0}")]
    Refused(String),
    /// The connection dropped or timed out; the call may succeed if tried again.
    #[error("the broker connection failed: {0}")]
    Connection(String),
}

impl BrokerError {
    /// Whether a later attempt of the same call could succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, BrokerError::Connection(_))
    }
}

/// The operations of `docs/contracts.md` §4 that a job's life needs.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Takes up to `max` messages with peek-lock, waiting up to `wait` for the first one.
    /// Never asks for more than `max`: the caller passes its free slots.
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError>;
    /// Removes a message: its job ended and its reply was sent.
    async fn complete(&self, lock_token: Uuid) -> Result<(), BrokerError>;
    /// Unlocks a message so it is delivered again at once.
    async fn abandon(&self, lock_token: Uuid) -> Result<(), BrokerError>;
    /// Moves a message to the dead-letter sub-queue with a reason and a one-line description.
    async fn dead_letter(
        &self,
        lock_token: Uuid,
        reason: &str,
        description: &str,
    ) -> Result<(), BrokerError> {
        let keep = std::collections::BTreeMap::new();
        self.dead_letter_keeping(lock_token, reason, description, &keep)
            .await
    }
    /// [`dead_letter`](Self::dead_letter), with `keep` merged into the message's application
    /// properties (Service Bus `properties-to-modify`): what an operator must find on the dead
    /// letter, such as the result of a job whose reply could not be sent.
    async fn dead_letter_keeping(
        &self,
        lock_token: Uuid,
        reason: &str,
        description: &str,
        keep: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), BrokerError>;
    /// Extends a lock; returns the new expiry.
    async fn renew_lock(&self, lock_token: Uuid) -> Result<tokio::time::Instant, BrokerError>;
    /// Sends a message to `queue`.
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), BrokerError>;
    /// Stops asking for messages (the engine is draining): no credit is left open, and
    /// messages that arrived but were never handed out are released at once.
    async fn stop_receiving(&self) {}
    /// Accepts the next session that has messages, on a jobs queue that requires sessions;
    /// `None` when none became available within `wait` (`docs/sessions.md`).
    async fn accept_session(
        &self,
        wait: Duration,
    ) -> Result<Option<Box<dyn session::SessionReceiver>>, BrokerError> {
        let _ = wait;
        Err(BrokerError::Refused(
            "this broker does not receive sessions".into(),
        ))
    }
    /// Sends a message to `queue` that becomes visible after `delay`.
    async fn schedule(
        &self,
        queue: &str,
        message: OutgoingMessage,
        delay: Duration,
    ) -> Result<(), BrokerError>;
}
