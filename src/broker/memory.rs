//! An in-memory broker with Service Bus's peek-lock semantics: lock duration, lock expiry and
//! redelivery, delivery count, scheduled messages and a dead-letter list. It runs on tokio's
//! clock, so engine tests can pause time, and it records every operation for assertions.
//! Sessions (`docs/sessions.md`) are in [`sessions`]: a broker made with
//! [`MemoryBroker::shared`] accepts them.

#[path = "memory_sessions.rs"]
mod sessions;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use super::{Broker, BrokerError, Delivery, OutgoingMessage};
use crate::job::MessageProperties;

/// A message at rest in the memory broker.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub sequence_number: i64,
    pub message: OutgoingMessage,
    pub delivery_count: u32,
    pub visible_at: Instant,
}

/// A dead-lettered message with its reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message: StoredMessage,
    pub reason: String,
    pub description: String,
}

/// One operation, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Sent {
        queue: String,
        message_id: Option<String>,
    },
    Scheduled {
        queue: String,
        message_id: Option<String>,
        delay: Duration,
    },
    Completed(i64),
    Abandoned(i64),
    DeadLettered {
        sequence_number: i64,
        reason: String,
    },
    Renewed(i64),
}

#[derive(Debug, Default)]
struct State {
    next_sequence: i64,
    /// Messages per queue, available or scheduled.
    queues: BTreeMap<String, VecDeque<StoredMessage>>,
    /// Locked messages of the source queue, by lock token, with their expiry.
    locked: BTreeMap<Uuid, (StoredMessage, Instant)>,
    dead_letters: Vec<DeadLetter>,
    events: Vec<Event>,
    /// Sends to these queues fail (to test what the engine does then).
    failing_queues: Vec<String>,
    /// The most messages ever locked at once (credit must never exceed free slots).
    peak_locked: usize,
    /// Held session locks: session id → (holder, expiry).
    session_locks: BTreeMap<String, (u64, Instant)>,
    next_holder: u64,
    /// Renewals by the holders up to this one never answer.
    stalled_holders: u64,
}

/// The in-memory broker, receiving from one source queue.
#[derive(Debug)]
pub struct MemoryBroker {
    source: String,
    lock_duration: Duration,
    max_delivery_count: u32,
    state: Mutex<State>,
    arrived: Notify,
    /// Itself, for the sessions it hands out (set by [`MemoryBroker::shared`]).
    this: Weak<MemoryBroker>,
}

impl MemoryBroker {
    pub fn new(source: &str, lock_duration: Duration, max_delivery_count: u32) -> Self {
        Self {
            source: source.to_owned(),
            lock_duration,
            max_delivery_count,
            state: Mutex::new(State {
                next_sequence: 1,
                ..Default::default()
            }),
            arrived: Notify::new(),
            this: Weak::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enqueue(&self, queue: &str, message: OutgoingMessage, visible_at: Instant) {
        let mut st = self.state();
        let sequence_number = st.next_sequence;
        st.next_sequence += 1;
        st.queues
            .entry(queue.to_owned())
            .or_default()
            .push_back(StoredMessage {
                sequence_number,
                message,
                delivery_count: 0,
                visible_at,
            });
        drop(st);
        self.arrived.notify_waiters();
    }

    /// Puts a job on the source queue as a producer would.
    pub fn push(&self, message: OutgoingMessage) {
        self.enqueue(&self.source.clone(), message, Instant::now());
    }

    /// Messages currently on `queue` (available or scheduled, not locked).
    pub fn messages(&self, queue: &str) -> Vec<StoredMessage> {
        self.state()
            .queues
            .get(queue)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.state().dead_letters.clone()
    }

    pub fn events(&self) -> Vec<Event> {
        self.state().events.clone()
    }

    pub fn locked_count(&self) -> usize {
        self.state().locked.len()
    }

    /// The most messages that were locked at the same time.
    pub fn peak_locked(&self) -> usize {
        self.state().peak_locked
    }

    /// The lock tokens currently held, oldest sequence number first.
    pub fn locked_tokens(&self) -> Vec<Uuid> {
        let st = self.state();
        let mut held: Vec<(i64, Uuid)> = st
            .locked
            .iter()
            .map(|(token, (msg, _))| (msg.sequence_number, *token))
            .collect();
        held.sort();
        held.into_iter().map(|(_, token)| token).collect()
    }

    /// Makes every send to `queue` fail with a connection error.
    pub fn fail_sends_to(&self, queue: &str) {
        self.state().failing_queues.push(queue.to_owned());
    }

    /// Takes a lock away as a broker does when it expires or the link drops.
    pub fn revoke_lock(&self, lock_token: Uuid) {
        let mut st = self.state();
        if let Some((mut msg, _)) = st.locked.remove(&lock_token) {
            msg.delivery_count += 1;
            msg.visible_at = Instant::now();
            st.queues
                .entry(self.source.clone())
                .or_default()
                .push_front(msg);
        }
    }

    /// Returns expired locks to the queue (delivery count + 1), dead-lettering messages that
    /// reached the maximum delivery count.
    fn expire_locks(&self, st: &mut State) {
        let now = Instant::now();
        let expired: Vec<Uuid> = st
            .locked
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            if let Some((mut msg, _)) = st.locked.remove(&token) {
                msg.delivery_count += 1;
                self.requeue(st, msg);
            }
        }
    }

    fn requeue(&self, st: &mut State, mut msg: StoredMessage) {
        if msg.delivery_count >= self.max_delivery_count {
            st.dead_letters.push(DeadLetter {
                message: msg,
                reason: "MaxDeliveryCountExceeded".into(),
                description: "the message was delivered too many times".into(),
            });
            return;
        }
        msg.visible_at = Instant::now();
        st.queues
            .entry(self.source.clone())
            .or_default()
            .push_front(msg);
    }

    fn take_available(&self, max: usize) -> Vec<Delivery> {
        let mut st = self.state();
        self.expire_locks(&mut st);
        let now = Instant::now();
        let mut taken = Vec::new();
        let queue = st.queues.entry(self.source.clone()).or_default();
        let mut rest = VecDeque::new();
        while let Some(msg) = queue.pop_front() {
            if taken.len() < max && msg.visible_at <= now {
                taken.push(msg);
            } else {
                rest.push_back(msg);
            }
        }
        *queue = rest;
        let locked_until = now + self.lock_duration;
        taken
            .into_iter()
            .map(|msg| {
                let token = Uuid::new_v4();
                let delivery = to_delivery(&msg, token, locked_until);
                st.locked.insert(token, (msg, locked_until));
                st.peak_locked = st.peak_locked.max(st.locked.len());
                delivery
            })
            .collect()
    }

    /// When the next scheduled (or locked) message could become available.
    fn next_wakeup(&self) -> Option<Instant> {
        let st = self.state();
        let scheduled = st
            .queues
            .get(&self.source)
            .and_then(|q| q.iter().map(|m| m.visible_at).min());
        let lock = st.locked.values().map(|(_, until)| *until).min();
        scheduled.into_iter().chain(lock).min()
    }

    fn settle(
        &self,
        token: Uuid,
        event: impl FnOnce(i64) -> Event,
    ) -> Result<StoredMessage, BrokerError> {
        let mut st = self.state();
        self.expire_locks(&mut st);
        let (msg, _) = st.locked.remove(&token).ok_or(BrokerError::LockLost)?;
        st.events.push(event(msg.sequence_number));
        Ok(msg)
    }
}

fn to_delivery(msg: &StoredMessage, lock_token: Uuid, locked_until: Instant) -> Delivery {
    let m = &msg.message;
    Delivery {
        lock_token,
        body: m.body.clone(),
        properties: MessageProperties {
            message_id: m.message_id.clone(),
            correlation_id: m.correlation_id.clone(),
            reply_to: m.reply_to.clone(),
            reply_to_session_id: m.reply_to_session_id.clone(),
            content_type: m.content_type.clone(),
            application: m.application.clone(),
            sequence_number: Some(msg.sequence_number),
        },
        delivery_count: msg.delivery_count,
        locked_until,
        enqueued_at: None,
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        let give_up = Instant::now() + wait;
        loop {
            let notified = self.arrived.notified();
            let taken = self.take_available(max);
            if !taken.is_empty() || Instant::now() >= give_up {
                return Ok(taken);
            }
            let wake = self.next_wakeup().map_or(give_up, |w| w.min(give_up));
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn complete(&self, lock_token: Uuid) -> Result<(), BrokerError> {
        self.settle(lock_token, Event::Completed).map(|_| ())
    }

    async fn abandon(&self, lock_token: Uuid) -> Result<(), BrokerError> {
        let mut msg = self.settle(lock_token, Event::Abandoned)?;
        msg.delivery_count += 1;
        let mut st = self.state();
        self.requeue(&mut st, msg);
        drop(st);
        self.arrived.notify_waiters();
        Ok(())
    }

    async fn dead_letter_keeping(
        &self,
        lock_token: Uuid,
        reason: &str,
        description: &str,
        keep: &BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        let mut msg = self.settle(lock_token, |seq| Event::DeadLettered {
            sequence_number: seq,
            reason: reason.to_owned(),
        })?;
        msg.message
            .application
            .extend(keep.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.state().dead_letters.push(DeadLetter {
            message: msg,
            reason: reason.to_owned(),
            description: description.to_owned(),
        });
        Ok(())
    }

    async fn renew_lock(&self, lock_token: Uuid) -> Result<Instant, BrokerError> {
        let mut st = self.state();
        self.expire_locks(&mut st);
        let until = Instant::now() + self.lock_duration;
        let (msg, expiry) = st
            .locked
            .get_mut(&lock_token)
            .ok_or(BrokerError::LockLost)?;
        *expiry = until;
        let seq = msg.sequence_number;
        st.events.push(Event::Renewed(seq));
        Ok(until)
    }

    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), BrokerError> {
        if self.state().failing_queues.iter().any(|q| q == queue) {
            return Err(BrokerError::Connection(format!(
                "sends to {queue} fail (test)"
            )));
        }
        self.state().events.push(Event::Sent {
            queue: queue.to_owned(),
            message_id: message.message_id.clone(),
        });
        self.enqueue(queue, message, Instant::now());
        Ok(())
    }

    async fn accept_session(
        &self,
        wait: Duration,
    ) -> Result<Option<Box<dyn super::session::SessionReceiver>>, BrokerError> {
        sessions::accept_session(self, wait).await
    }

    async fn schedule(
        &self,
        queue: &str,
        message: OutgoingMessage,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        if self.state().failing_queues.iter().any(|q| q == queue) {
            return Err(BrokerError::Connection(format!(
                "sends to {queue} fail (test)"
            )));
        }
        self.state().events.push(Event::Scheduled {
            queue: queue.to_owned(),
            message_id: message.message_id.clone(),
            delay,
        });
        self.enqueue(queue, message, Instant::now() + delay);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str) -> OutgoingMessage {
        OutgoingMessage {
            message_id: Some(id.into()),
            body: b"{}".to_vec(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lock_expiry_redelivers_with_a_higher_count() {
        let b = MemoryBroker::new("jobs", Duration::from_secs(30), 10);
        b.push(msg("a"));
        let first = b.receive(5, Duration::from_secs(1)).await.expect("rx");
        assert_eq!(first.len(), 1);
        assert!(
            b.receive(5, Duration::from_secs(1))
                .await
                .expect("rx")
                .is_empty()
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        let again = b.receive(5, Duration::from_secs(1)).await.expect("rx");
        assert_eq!(again[0].delivery_count, 1);
        assert_eq!(
            b.complete(first[0].lock_token).await,
            Err(BrokerError::LockLost)
        );
        b.complete(again[0].lock_token).await.expect("complete");
    }

    #[tokio::test(start_paused = true)]
    async fn scheduled_messages_wait_for_their_time_and_receive_respects_max() {
        let b = MemoryBroker::new("jobs", Duration::from_secs(30), 10);
        b.schedule("jobs", msg("later"), Duration::from_secs(10))
            .await
            .expect("sched");
        b.push(msg("a"));
        b.push(msg("b"));
        let got = b.receive(1, Duration::from_secs(1)).await.expect("rx");
        assert_eq!(got.len(), 1);
        let got = b.receive(5, Duration::from_secs(1)).await.expect("rx");
        assert_eq!(got.len(), 1);
        let got = b.receive(5, Duration::from_secs(20)).await.expect("rx");
        assert_eq!(got[0].properties.message_id.as_deref(), Some("later"));
    }
}
