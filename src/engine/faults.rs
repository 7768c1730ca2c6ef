//! The daemon's own faults: counted, logged, and held against the daemon, never the job.
//!
//! When the daemon cannot start a job (no cgroup, no temp folder, no descriptors, a warm parent
//! that cannot fork), the job is innocent: its message is abandoned so that it runs again here
//! or on another replica, and no attempt is counted. While such faults go on the daemon is not
//! ready (`/readyz` answers 503, so a rollout stops and Kubernetes sends no traffic) and it
//! waits longer and longer before taking more jobs, so that a broken pod does not bounce every
//! message of the queue towards its `MaxDeliveryCount`. The first job that starts clears it.

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::runner::FaultStage;
use crate::telemetry::http::readiness;
use crate::telemetry::metrics::metrics;

/// The first pause after a fault; it doubles with each further fault, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// The longest pause between receives while faults go on.
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// Consecutive daemon faults, shared by the engine's receive loop and its jobs.
#[derive(Debug, Default)]
pub struct Faults {
    consecutive: Mutex<u32>,
}

impl Faults {
    /// A job could not be started because of `stage`.
    pub fn record(&self, stage: FaultStage) {
        let mut n = self.consecutive.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_add(1);
        metrics().daemon_fault(stage.as_str());
        readiness().daemon_faults.store(true, Ordering::SeqCst);
    }

    /// A job started: the daemon works again.
    pub fn clear(&self) {
        let mut n = self.consecutive.lock().unwrap_or_else(|e| e.into_inner());
        if *n > 0 {
            *n = 0;
            readiness().daemon_faults.store(false, Ordering::SeqCst);
            tracing::info!("A job started again after daemon faults; the daemon is ready.");
        }
    }

    /// How long to wait before the next receive, while faults go on.
    pub fn pause(&self) -> Option<Duration> {
        let n = *self.consecutive.lock().unwrap_or_else(|e| e.into_inner());
        (n > 0).then(|| {
            let doubled = FIRST_PAUSE.saturating_mul(1u32 << (n - 1).min(16));
            doubled.min(MAX_PAUSE)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_pause_receiving_longer_each_time_until_a_job_starts() {
        let faults = Faults::default();
        assert_eq!(faults.pause(), None);
        faults.record(FaultStage::Start);
        assert_eq!(faults.pause(), Some(Duration::from_millis(250)));
        faults.record(FaultStage::Cgroup);
        assert_eq!(faults.pause(), Some(Duration::from_millis(500)));
        for _ in 0..20 {
            faults.record(FaultStage::Start);
        }
        assert_eq!(faults.pause(), Some(MAX_PAUSE));
        assert!(!readiness().is_ready());
        faults.clear();
        assert_eq!(faults.pause(), None);
        assert!(!readiness().daemon_faults.load(Ordering::SeqCst));
    }
}
