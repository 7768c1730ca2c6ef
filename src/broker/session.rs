//! A session a broker has locked for this daemon (`docs/sessions.md`): its messages come one
//! at a time, in order, to whoever holds the session lock, and are settled under that lock.
//!
//! Kept apart from [`Broker`](super::Broker) because the shape differs: a plain queue hands
//! out messages from one receiver, while each session is its own receiver with its own lock.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::{BrokerError, Delivery};

/// One accepted session. Dropping it without [`close`](Self::close) leaves its lock to run out.
#[async_trait]
pub trait SessionReceiver: Send + Sync {
    /// The session's id (the jobs' SessionId).
    fn session_id(&self) -> &str;
    /// The session's next message, waiting up to `wait`; `None` when none came. A message's
    /// lock is the session's: it lasts while the session lock is renewed.
    async fn receive(&self, wait: Duration) -> Result<Option<Delivery>, BrokerError>;
    /// Extends the session lock; returns its new expiry. `LockLost` when it is gone.
    async fn renew(&self) -> Result<tokio::time::Instant, BrokerError>;
    async fn complete(&self, lock_token: Uuid) -> Result<(), BrokerError>;
    async fn abandon(&self, lock_token: Uuid) -> Result<(), BrokerError>;
    async fn dead_letter_keeping(
        &self,
        lock_token: Uuid,
        reason: &str,
        description: &str,
        keep: &BTreeMap<String, String>,
    ) -> Result<(), BrokerError>;
    /// Lets the session go (its lock is released; unsettled messages are delivered again).
    async fn close(&self);
}
