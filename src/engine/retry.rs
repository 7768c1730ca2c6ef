//! Delays between attempts: exponential backoff with jitter, from `backon`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::worker::RetryPolicy;

/// The delay before attempt `next_attempt` (2 for the first retry). Doubling from the
/// policy's initial delay, capped at its maximum, with random jitter of up to one delay added
/// so that jobs failing together do not come back together.
pub fn delay_before(policy: &RetryPolicy, next_attempt: u32) -> Duration {
    let min = Duration::from_secs_f64(policy.initial_delay_s);
    let max = Duration::from_secs_f64(policy.max_delay_s);
    let retries = next_attempt.saturating_sub(1).max(1) as usize;
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(retries)
        .build()
        .nth(retries - 1)
        .unwrap_or(max)
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_the_attempt_and_stay_under_the_cap() {
        let policy = RetryPolicy {
            initial_delay_s: 1.0,
            max_delay_s: 60.0,
        };
        for _ in 0..50 {
            let d2 = delay_before(&policy, 2);
            let d3 = delay_before(&policy, 3);
            let d4 = delay_before(&policy, 4);
            assert!(
                d2 >= Duration::from_secs(1) && d2 < Duration::from_secs(2),
                "{d2:?}"
            );
            assert!(
                d3 >= Duration::from_secs(2) && d3 < Duration::from_secs(4),
                "{d3:?}"
            );
            assert!(
                d4 >= Duration::from_secs(4) && d4 < Duration::from_secs(8),
                "{d4:?}"
            );
            assert!(delay_before(&policy, 30) <= Duration::from_secs(60));
        }
    }
}
