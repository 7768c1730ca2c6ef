//! Keeping a running job's lock: renew it before it runs out, until the job ends or the
//! renewal ceiling is reached; if it is lost, stop the job (another delivery will run it).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::{Broker, BrokerError};
use crate::telemetry::metrics::metrics;

/// How a lock keeper ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockEnd {
    /// The job ended first (the keeper was cancelled).
    JobEnded,
    /// The lock is gone: the job must be stopped and its message left alone.
    Lost,
    /// The ceiling was reached; the lock will run out on its own.
    CeilingReached,
}

/// The shortest wait between two renewals: an expiry that is already past on this host's clock
/// (a clock far ahead of the broker's) must not turn renewing into a busy loop.
const MIN_RENEW_GAP: Duration = Duration::from_millis(100);

/// When to renew a lock with `remaining` time left: at half of it, and never sooner than
/// [`MIN_RENEW_GAP`].
pub(super) fn renew_after(remaining: Duration) -> Duration {
    (remaining / 2).max(MIN_RENEW_GAP)
}

/// Renews `lock_token` until `done` is cancelled. Renews at half the remaining lock time, so a
/// failed renewal still leaves time for another try; transient errors are retried every second
/// while the lock lasts.
pub async fn keep_lock(
    broker: Arc<dyn Broker>,
    lock_token: Uuid,
    mut locked_until: Instant,
    ceiling: Duration,
    done: CancellationToken,
) -> LockEnd {
    let give_up = Instant::now() + ceiling;
    loop {
        let now = Instant::now();
        if now >= give_up {
            return LockEnd::CeilingReached;
        }
        let remaining = locked_until.saturating_duration_since(now);
        let renew_at = (now + renew_after(remaining)).min(give_up);
        tokio::select! {
            () = done.cancelled() => return LockEnd::JobEnded,
            () = tokio::time::sleep_until(renew_at) => {}
        }
        if Instant::now() >= give_up {
            return LockEnd::CeilingReached;
        }
        match broker.renew_lock(lock_token).await {
            Ok(until) => {
                metrics().lock_renewals.inc();
                tracing::debug!("Renewed the job's lock.");
                locked_until = until;
            }
            Err(BrokerError::LockLost) => {
                metrics().lock_losses.inc();
                return LockEnd::Lost;
            }
            Err(e) if Instant::now() + Duration::from_secs(1) < locked_until => {
                tracing::warn!(error = %e, "Renewing the job's lock failed; trying again.");
                tokio::select! {
                    () = done.cancelled() => return LockEnd::JobEnded,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Renewing the job's lock failed and the lock ran out.");
                metrics().lock_losses.inc();
                return LockEnd::Lost;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_come_at_half_the_remaining_time_and_never_in_a_busy_loop() {
        assert_eq!(
            renew_after(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        // An expiry already past here (a clock ahead of the broker's) still waits between tries.
        assert_eq!(renew_after(Duration::ZERO), MIN_RENEW_GAP);
    }
}
