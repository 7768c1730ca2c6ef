//! Broker-level errors and their Service Bus wire form (status code + condition, §6.3).

use fe2o3_amqp_types::definitions::{Error as AmqpError, ErrorCondition};
use fe2o3_amqp_types::primitives::Symbol;
use thiserror::Error;

use super::store::StoreError;

/// A failed broker operation. Each variant maps to one condition and one status code, so the
/// same error reads the same on a link, a disposition and a management response.
#[derive(Debug, Error)]
pub enum SbError {
    /// The entity does not exist.
    #[error("entity {0} not found")]
    EntityNotFound(String),
    /// A sequence number or lock token names no message.
    #[error("{0}")]
    MessageNotFound(String),
    /// The lock token is unknown or its lock expired.
    #[error("the lock supplied is invalid: it expired, or the message was already settled")]
    LockLost,
    /// The session lock expired or belongs to another receiver.
    #[error("the session lock was lost")]
    SessionLockLost,
    /// Another receiver holds the session.
    #[error("session {0} is locked by another receiver")]
    SessionCannotBeLocked(String),
    /// The client asked for something Service Bus refuses.
    #[error("{0}")]
    NotAllowed(String),
    /// A request field is missing or malformed.
    #[error("{0}")]
    Argument(String),
    /// The token is missing, expired or wrong.
    #[error("{0}")]
    Unauthorized(String),
    /// Nothing became available in time.
    #[error("{0}")]
    Timeout(String),
    /// A message is bigger than the entity allows.
    #[error("{0}")]
    MessageTooLarge(String),
    /// The entity holds `MaxSizeInMegabytes` already (Python: `ServiceBusQuotaExceededError`).
    #[error("{0}")]
    QuotaExceeded(String),
    /// Storage failed; the client should retry.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl SbError {
    /// The AMQP error condition (§6.3).
    pub fn condition(&self) -> &'static str {
        match self {
            SbError::EntityNotFound(_) => "amqp:not-found",
            SbError::MessageNotFound(_) => "com.microsoft:message-not-found",
            SbError::LockLost => "com.microsoft:message-lock-lost",
            SbError::SessionLockLost => "com.microsoft:session-lock-lost",
            SbError::SessionCannotBeLocked(_) => "com.microsoft:session-cannot-be-locked",
            SbError::NotAllowed(_) => "amqp:not-allowed",
            SbError::Argument(_) => "com.microsoft:argument-error",
            SbError::Unauthorized(_) => "amqp:unauthorized-access",
            SbError::Timeout(_) => "com.microsoft:timeout",
            SbError::MessageTooLarge(_) => "amqp:link:message-size-exceeded",
            SbError::QuotaExceeded(_) => "amqp:resource-limit-exceeded",
            SbError::Store(_) => "com.microsoft:server-busy",
        }
    }

    /// The management status code (§6.3).
    pub fn status(&self) -> i32 {
        match self {
            SbError::EntityNotFound(_) | SbError::MessageNotFound(_) => 404,
            SbError::LockLost | SbError::SessionLockLost | SbError::SessionCannotBeLocked(_) => 410,
            SbError::NotAllowed(_) | SbError::Argument(_) => 400,
            SbError::Unauthorized(_) => 401,
            SbError::Timeout(_) => 408,
            SbError::MessageTooLarge(_) | SbError::QuotaExceeded(_) => 403,
            SbError::Store(_) => 503,
        }
    }

    /// The AMQP error for a detach, a rejected outcome or a close.
    pub fn to_amqp(&self) -> AmqpError {
        amqp_error(self.condition(), &self.to_string())
    }
}

/// Builds an AMQP error with any condition symbol.
pub fn amqp_error(condition: &str, description: &str) -> AmqpError {
    AmqpError {
        condition: ErrorCondition::Custom(Symbol::from(condition)),
        description: Some(description.to_string()),
        info: None,
    }
}
