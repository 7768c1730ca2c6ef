//! Settling a message on the receive link that delivered it, while that link lives.
//!
//! A disposition on the link is one frame the broker applies in place; settling through the
//! management node is a request and a response with encoded maps on both sides
//! (`docs/servicebus-protocol.md`). So a delivery is remembered with the link it came on, and
//! complete, abandon and dead-letter go on that link as `accepted`, `modified`
//! (delivery-failed, as Service Bus's SDKs abandon) and `rejected` with the condition
//! `com.microsoft:dead-letter` and `DeadLetterReason` / `DeadLetterErrorDescription` in the
//! error's info. Only when that link is gone (a reconnect, a receiver replaced) does settlement
//! fall back to the management node by lock token, which stays valid across links.
//!
//! Two things stay on the management node: dead-letters that keep properties, and lock renewal
//! (no link operation renews a lock). A `rejected` outcome has no field of its own for
//! properties to modify: only Microsoft's JavaScript SDK slips them into the error's info, the
//! Python SDK cannot send them on the link at all, and the embedded emulator reads only the two
//! reasons there (`docs/servicebus-protocol.md` §5.1). Their one caller, a job whose reply could
//! not be sent, is rare, and the management node's answer says the result was kept.
//!
//! fe2o3-amqp sends a disposition without waiting for the broker's settled answer, so a link
//! settlement cannot report a lost lock. A delivery whose lock is known to run out within
//! [`LOCK_MARGIN`] (by its `locked-until`, moved by each renewal) is therefore settled by lock
//! token, whose answer says whether the lock still held (`LockLost`). A lock the broker took
//! away early anyway is not reported back: the broker drops the settlement and redelivers the
//! message when the lock has run out, which is what a `LockLost` answer led to as well (the
//! reply, sent first, is deduplicated by its MessageId). Lock loss while the job runs is still
//! detected by renewal (`crate::engine::lock`).

use std::collections::HashMap;
use std::sync::Mutex as SyncMutex;
use std::time::Duration;

use fe2o3_amqp::ReceiverDisposer;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::types::definitions::{Error as AmqpError, ErrorCondition, Fields};
use fe2o3_amqp::types::messaging::Modified;
use fe2o3_amqp::types::primitives::{Symbol, Value};
use tokio::time::Instant;
use uuid::Uuid;

use super::ServiceBusBroker;

/// How long a settlement waits for the receiver before asking a receive for it again.
const ASK_AGAIN: Duration = Duration::from_millis(50);
/// A delivery with less of its lock left than this is settled by lock token (see above).
const LOCK_MARGIN: Duration = Duration::from_secs(2);

/// The error condition of a dead-letter disposition.
const DEAD_LETTER: &str = "com.microsoft:dead-letter";

/// How a message is settled.
#[derive(Debug, Clone, Copy)]
pub(super) enum LinkOutcome<'a> {
    Complete,
    Abandon,
    DeadLetter {
        reason: &'a str,
        description: &'a str,
    },
}

/// The deliveries of the open receive link, by lock token, and a way to settle them without
/// the receiver's lock (which a waiting receive holds).
#[derive(Default)]
pub(super) struct LinkDeliveries {
    inner: SyncMutex<Deliveries>,
}

#[derive(Default)]
struct Deliveries {
    /// The open receive links' disposers, by serial (one for the jobs queue; a session
    /// receiver can register its own).
    open: HashMap<u64, ReceiverDisposer>,
    /// Deliveries not yet settled.
    by_token: HashMap<Uuid, OnLink>,
}

struct OnLink {
    /// The serial of the link it came on.
    link: u64,
    info: DeliveryInfo,
    locked_until: Instant,
}

impl LinkDeliveries {
    fn state(&self) -> std::sync::MutexGuard<'_, Deliveries> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receive link was attached: its deliveries settle through `disposer`.
    pub(super) fn opened(&self, link: u64, disposer: ReceiverDisposer) {
        self.state().open.insert(link, disposer);
    }

    /// The receive link `link` is closed or lost: its deliveries settle by lock token.
    pub(super) fn gone(&self, link: u64) {
        let mut state = self.state();
        state.open.remove(&link);
        // A job whose lock was lost settles nothing: its entry goes with its link.
        state.by_token.retain(|_, d| d.link != link);
    }

    pub(super) fn delivered(
        &self,
        link: u64,
        token: Uuid,
        info: DeliveryInfo,
        locked_until: Instant,
    ) {
        let delivery = OnLink {
            link,
            info,
            locked_until,
        };
        self.state().by_token.insert(token, delivery);
    }

    /// The lock of `token` was renewed until `until`.
    pub(super) fn renewed(&self, token: Uuid, until: Instant) {
        if let Some(d) = self.state().by_token.get_mut(&token) {
            d.locked_until = until;
        }
    }

    /// Forgets the delivery of `token` (settled by lock token instead).
    pub(super) fn forget(&self, token: Uuid) {
        self.state().by_token.remove(&token);
    }

    pub(super) fn clear(&self) {
        *self.state() = Deliveries::default();
    }

    /// Takes the delivery of `token` when the link it came on is still open and its lock is
    /// not about to run out.
    fn take(&self, token: Uuid) -> Option<(u64, DeliveryInfo, ReceiverDisposer)> {
        let mut state = self.state();
        let d = state.by_token.remove(&token)?;
        let disposer = state.open.get(&d.link)?;
        let held = Instant::now() + LOCK_MARGIN < d.locked_until;
        held.then(|| (d.link, d.info, disposer.clone()))
    }
}

impl ServiceBusBroker {
    /// Settles the delivery of `token` on the link that delivered it; `false` when that link
    /// is gone (or the disposition could not be sent), and the caller settles by lock token.
    pub(super) async fn settle_on_link(&self, token: Uuid, outcome: LinkOutcome<'_>) -> bool {
        let Some((link, info, disposer)) = self.deliveries.take(token) else {
            return false;
        };
        let sent = match outcome {
            // The hot path: no lock on the receiver, which a waiting receive may hold.
            LinkOutcome::Complete => disposer.accept(info).await,
            LinkOutcome::Abandon | LinkOutcome::DeadLetter { .. } => {
                // Only the receiver itself sends `modified` and `rejected`: ask a waiting
                // receive to return early, then take the receiver (asking again in case the
                // receive had not started waiting yet).
                let slot = loop {
                    self.receiver_wanted.notify_waiters();
                    let lock = self.receiver.lock();
                    if let Ok(slot) = tokio::time::timeout(ASK_AGAIN, lock).await {
                        break slot;
                    }
                };
                let Some(open) = slot.as_ref().filter(|r| r.serial == link) else {
                    return false;
                };
                match outcome {
                    LinkOutcome::DeadLetter {
                        reason,
                        description,
                    } => {
                        open.receiver
                            .reject(info, dead_letter_error(reason, description))
                            .await
                    }
                    _ => open.receiver.modify(info, abandoned()).await,
                }
            }
        };
        match sent {
            Ok(()) => {
                self.stats
                    .settled_on_link
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "A settlement could not be sent on the receive link; settling by lock token.");
                false
            }
        }
    }
}

/// Abandon as Service Bus's SDKs send it: the delivery failed (the delivery count goes up),
/// and it may come back here.
fn abandoned() -> Modified {
    Modified {
        delivery_failed: Some(true),
        undeliverable_here: Some(false),
        message_annotations: None,
    }
}

/// The error of a dead-letter `rejected`, as the azure-servicebus SDK encodes it.
fn dead_letter_error(reason: &str, description: &str) -> AmqpError {
    let mut info = Fields::new();
    info.insert(
        Symbol::from("DeadLetterReason"),
        Value::String(reason.to_owned()),
    );
    info.insert(
        Symbol::from("DeadLetterErrorDescription"),
        Value::String(description.to_owned()),
    );
    AmqpError::new(
        ErrorCondition::Custom(Symbol::from(DEAD_LETTER)),
        Some(description.to_owned()),
        Some(info),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_error_carries_the_reason_in_its_info() {
        let e = dead_letter_error("HandlerError", "the handler raised");
        assert_eq!(
            e.condition,
            ErrorCondition::Custom(Symbol::from("com.microsoft:dead-letter"))
        );
        let info = e.info.expect("info");
        assert_eq!(
            info.get(&Symbol::from("DeadLetterReason")),
            Some(&Value::String("HandlerError".into()))
        );
        assert_eq!(
            info.get(&Symbol::from("DeadLetterErrorDescription")),
            Some(&Value::String("the handler raised".into()))
        );
    }
}
