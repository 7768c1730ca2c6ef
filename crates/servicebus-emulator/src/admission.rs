//! Connections that have not authenticated yet, bounded in number and time (Service Bus drops
//! a connection that puts no token within 20 s).
//!
//! Each accepted connection holds an [`Unauthenticated`] ticket until its first valid token
//! (or until it ends). When the bound is reached, the *oldest* ticket is evicted to admit the
//! newcomer: a flood of connections that never authenticate then holds at most the bound of
//! descriptors, and cannot lock real clients out either, because those authenticate within
//! milliseconds of connecting, long before a flood reaches them in the queue.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// The tickets out now, oldest first.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    state: Mutex<Tickets>,
}

#[derive(Debug, Default)]
struct Tickets {
    next: u64,
    open: VecDeque<(u64, CancellationToken)>,
}

/// One connection counted as unauthenticated. `evicted` is cancelled when newer connections
/// pushed it out; the connection must then close. Dropping it ends the count.
#[derive(Debug)]
pub struct Unauthenticated {
    admission: Arc<Admission>,
    id: u64,
    /// Cancelled when newer connections pushed this one out.
    pub evicted: CancellationToken,
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.admission
            .tickets()
            .open
            .retain(|(id, _)| *id != self.id);
    }
}

impl Admission {
    /// At most `max` (at least 1) connections without a token at once.
    pub fn new(max: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max: max.max(1),
            state: Mutex::new(Tickets::default()),
        })
    }

    fn tickets(&self) -> std::sync::MutexGuard<'_, Tickets> {
        // The critical sections cannot panic; a poisoned lock still holds consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ticket for a newly accepted connection, evicting the oldest when the bound is
    /// reached.
    pub fn admit(self: &Arc<Self>) -> Unauthenticated {
        let mut tickets = self.tickets();
        while tickets.open.len() >= self.max {
            if let Some((_, oldest)) = tickets.open.pop_front() {
                oldest.cancel();
            }
        }
        let id = tickets.next;
        tickets.next += 1;
        let evicted = CancellationToken::new();
        tickets.open.push_back((id, evicted.clone()));
        Unauthenticated {
            admission: self.clone(),
            id,
            evicted,
        }
    }

    /// Connections counted now.
    pub fn count(&self) -> usize {
        self.tickets().open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_ticket_makes_room_and_dropped_ones_leave_the_count() {
        let admission = Admission::new(2);
        let first = admission.admit();
        let second = admission.admit();
        assert_eq!(admission.count(), 2);
        let third = admission.admit();
        assert!(first.evicted.is_cancelled(), "the oldest is pushed out");
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        assert_eq!(admission.count(), 2);
        drop(first);
        assert_eq!(
            admission.count(),
            2,
            "an evicted ticket was already out of the count"
        );
        drop(second);
        assert_eq!(admission.count(), 1);
        drop(third);
        assert_eq!(admission.count(), 0);
    }
}
