//! Sessions on the in-memory broker, as Service Bus has them (`docs/sessions.md`): a session
//! (the messages of one SessionId) is locked by one holder at a time; its messages come to
//! that holder in order, one after another, and their locks are the session lock (renewed
//! with it, lost with it, released with it).

use std::sync::Arc;

use super::*;
use crate::broker::session::SessionReceiver;

impl MemoryBroker {
    /// A broker that also accepts sessions ([`Broker::accept_session`]).
    pub fn shared(source: &str, lock_duration: Duration, max_delivery_count: u32) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            this: this.clone(),
            ..Self::new(source, lock_duration, max_delivery_count)
        })
    }

    /// Takes a session lock away, as a broker does when it expires or the link drops: the
    /// session's locked messages go back (delivery count + 1).
    pub fn revoke_session(&self, session_id: &str) {
        let mut st = self.state();
        st.session_locks.remove(session_id);
        let held: Vec<Uuid> = st
            .locked
            .iter()
            .filter(|(_, (m, _))| m.message.session_id.as_deref() == Some(session_id))
            .map(|(t, _)| *t)
            .collect();
        for token in held {
            if let Some((mut msg, _)) = st.locked.remove(&token) {
                msg.delivery_count += 1;
                self.requeue(&mut st, msg);
            }
        }
        drop(st);
        self.arrived.notify_waiters();
    }

    /// Session-lock renewals by the sessions held now get no answer, as from a broker that
    /// stopped answering their management links; later holders renew as usual.
    pub fn stall_session_renewals(&self) {
        let mut st = self.state();
        st.stalled_holders = st.next_holder;
    }

    /// When waiting for a session (or a session's message) may end: the next scheduled
    /// message, message lock or session lock to come. Messages already visible do not count:
    /// those of held sessions stay where they are.
    fn session_wakeup(&self) -> Option<Instant> {
        let st = self.state();
        let now = Instant::now();
        let scheduled = st
            .queues
            .get(&self.source)
            .into_iter()
            .flatten()
            .map(|m| m.visible_at);
        let locks = st.locked.values().map(|(_, until)| *until);
        let sessions = st.session_locks.values().map(|(_, until)| *until);
        scheduled
            .chain(locks)
            .chain(sessions)
            .filter(|w| *w > now)
            .min()
    }

    /// Locks the first session with an available message that nobody holds.
    fn lock_next_session(&self) -> Option<(String, u64, Instant)> {
        let mut st = self.state();
        self.expire_locks(&mut st);
        let now = Instant::now();
        st.session_locks.retain(|_, (_, until)| *until > now);
        let queue = st.queues.get(&self.source)?;
        let sid = queue
            .iter()
            .filter(|m| m.visible_at <= now)
            .filter_map(|m| m.message.session_id.clone())
            .find(|sid| !st.session_locks.contains_key(sid))?;
        st.next_holder += 1;
        let holder = st.next_holder;
        let until = now + self.lock_duration;
        st.session_locks.insert(sid.clone(), (holder, until));
        Some((sid, holder, until))
    }
}

/// One session held on a [`MemoryBroker`].
struct MemorySession {
    broker: Arc<MemoryBroker>,
    session_id: String,
    holder: u64,
}

impl MemorySession {
    /// The session lock's expiry while this holder has it.
    fn held(&self, st: &State) -> Result<Instant, BrokerError> {
        st.session_locks
            .get(&self.session_id)
            .filter(|(holder, until)| *holder == self.holder && *until > Instant::now())
            .map(|(_, until)| *until)
            .ok_or(BrokerError::LockLost)
    }

    /// Locks the session's first available message under the session lock.
    fn take(&self) -> Result<Option<Delivery>, BrokerError> {
        let b = &self.broker;
        let mut st = b.state();
        b.expire_locks(&mut st);
        let until = self.held(&st)?;
        let now = Instant::now();
        let queue = st.queues.entry(b.source.clone()).or_default();
        let Some(at) = queue.iter().position(|m| {
            m.visible_at <= now && m.message.session_id.as_deref() == Some(&self.session_id)
        }) else {
            return Ok(None);
        };
        let Some(msg) = queue.remove(at) else {
            return Ok(None);
        };
        let token = Uuid::new_v4();
        let delivery = to_delivery(&msg, token, until);
        st.locked.insert(token, (msg, until));
        st.peak_locked = st.peak_locked.max(st.locked.len());
        Ok(Some(delivery))
    }
}

#[async_trait]
impl SessionReceiver for MemorySession {
    fn session_id(&self) -> &str {
        &self.session_id
    }

    async fn receive(&self, wait: Duration) -> Result<Option<Delivery>, BrokerError> {
        let give_up = Instant::now() + wait;
        loop {
            let notified = self.broker.arrived.notified();
            if let Some(delivery) = self.take()? {
                return Ok(Some(delivery));
            }
            if Instant::now() >= give_up {
                return Ok(None);
            }
            let wake = self
                .broker
                .session_wakeup()
                .map_or(give_up, |w| w.min(give_up));
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn renew(&self) -> Result<Instant, BrokerError> {
        let b = &self.broker;
        if self.holder <= b.state().stalled_holders {
            std::future::pending::<()>().await;
        }
        let mut st = b.state();
        b.expire_locks(&mut st);
        self.held(&st)?;
        let until = Instant::now() + b.lock_duration;
        st.session_locks
            .insert(self.session_id.clone(), (self.holder, until));
        for (msg, expiry) in st.locked.values_mut() {
            if msg.message.session_id.as_deref() == Some(&self.session_id) {
                *expiry = until;
            }
        }
        Ok(until)
    }

    async fn complete(&self, lock_token: Uuid) -> Result<(), BrokerError> {
        self.broker.complete(lock_token).await
    }

    async fn abandon(&self, lock_token: Uuid) -> Result<(), BrokerError> {
        self.broker.abandon(lock_token).await
    }

    async fn dead_letter_keeping(
        &self,
        lock_token: Uuid,
        reason: &str,
        description: &str,
        keep: &BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        self.broker
            .dead_letter_keeping(lock_token, reason, description, keep)
            .await
    }

    async fn close(&self) {
        let b = &self.broker;
        let mut st = b.state();
        if self.held(&st).is_err() {
            return;
        }
        st.session_locks.remove(&self.session_id);
        // What the holder never settled goes back unlocked, without counting a delivery.
        let held: Vec<Uuid> = st
            .locked
            .iter()
            .filter(|(_, (m, _))| m.message.session_id.as_deref() == Some(&self.session_id))
            .map(|(t, _)| *t)
            .collect();
        for token in held {
            if let Some((msg, _)) = st.locked.remove(&token) {
                b.requeue(&mut st, msg);
            }
        }
        drop(st);
        b.arrived.notify_waiters();
    }
}

/// The session side of the memory broker's [`Broker`] implementation.
pub(super) async fn accept_session(
    broker: &MemoryBroker,
    wait: Duration,
) -> Result<Option<Box<dyn SessionReceiver>>, BrokerError> {
    let Some(this) = broker.this.upgrade() else {
        return Err(BrokerError::Refused(
            "this memory broker takes no sessions; make it with MemoryBroker::shared".into(),
        ));
    };
    let give_up = Instant::now() + wait;
    loop {
        let notified = broker.arrived.notified();
        if let Some((session_id, holder, _)) = broker.lock_next_session() {
            return Ok(Some(Box::new(MemorySession {
                broker: this,
                session_id,
                holder,
            })));
        }
        if Instant::now() >= give_up {
            return Ok(None);
        }
        let wake = broker.session_wakeup().map_or(give_up, |w| w.min(give_up));
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}
