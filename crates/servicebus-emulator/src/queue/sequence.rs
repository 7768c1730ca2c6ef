//! Operations by lock token or sequence number: renew, peek, cancel, deferred receive.

use uuid::Uuid;

use super::*;

impl Namespace {
    /// Extends locks; returns the new expiry of each, in order (§6.2 `renew-lock`).
    pub fn renew_locks(&self, tokens: &[Uuid]) -> Result<Vec<i64>, SbError> {
        let now = self.clock.now_ms();
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut out = Vec::with_capacity(tokens.len());
        for token in tokens {
            let (queue, dlq, seq) = state.locks.get(token).cloned().ok_or(SbError::LockLost)?;
            let q = state
                .queues
                .get_mut(&queue.to_ascii_lowercase())
                .ok_or(SbError::LockLost)?;
            let lock_ms = q.lock_ms();
            let lock = q
                .map(dlq)
                .get_mut(&seq)
                .and_then(|l| l.lock.as_mut())
                .filter(|l| l.token == *token && l.until_ms > now)
                .ok_or(SbError::LockLost)?;
            lock.until_ms = now + lock_ms;
            out.push(lock.until_ms);
        }
        Ok(out)
    }

    /// Returns up to `count` encoded messages from `from_seq` on, without locking (§6.2).
    pub fn peek(
        &self,
        e: &EntityRef,
        from_seq: i64,
        count: usize,
        session: Option<&str>,
    ) -> Result<Vec<Vec<u8>>, SbError> {
        self.peek_within(e, from_seq, count, session, usize::MAX)
    }

    /// [`peek`](Self::peek), stopping before the messages' total size would pass `budget`
    /// bytes (the first message always goes): a peek response must fit the link it is sent
    /// on, so the caller asks again from the next sequence number.
    pub fn peek_within(
        &self,
        e: &EntityRef,
        from_seq: i64,
        count: usize,
        session: Option<&str>,
        budget: usize,
    ) -> Result<Vec<Vec<u8>>, SbError> {
        let now = self.clock.now_ms();
        let mut guard = self.lock();
        let q = queue_mut(&mut guard.queues, e)?;
        let map = q.map(e.dlq);
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut size = 0usize;
        for live in map.range(from_seq.max(0)..).map(|(_, l)| l) {
            if out.len() >= count {
                break;
            }
            if session.is_some() && live.m.parts.session_id() != session {
                continue;
            }
            if !e.dlq && live.m.expires_ms.is_some_and(|x| x <= now) {
                continue;
            }
            let bytes = render(&live.m, None, true)?;
            size = size.saturating_add(bytes.len());
            if !out.is_empty() && size > budget {
                break;
            }
            out.push(bytes);
        }
        Ok(out)
    }

    /// Cancels scheduled messages by sequence number.
    pub fn cancel_scheduled(&self, e: &EntityRef, seqs: &[i64]) -> Result<(), SbError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let key = e.queue.to_ascii_lowercase();
        if state.topics.contains_key(&key) {
            return topic::cancel(state, &key, seqs);
        }
        let q = queue_mut(&mut state.queues, e)?;
        for seq in seqs {
            let scheduled = q
                .active
                .get(seq)
                .is_some_and(|l| l.m.state == MsgState::Scheduled);
            if !scheduled {
                return Err(SbError::MessageNotFound(format!(
                    "no scheduled message with sequence number {seq}"
                )));
            }
            state.store.delete(&q.cfg.name, *seq)?;
            q.active.remove(seq);
        }
        Ok(())
    }

    /// Locks (or, without `peek_lock`, deletes) deferred messages by sequence number.
    pub fn receive_deferred(
        &self,
        e: &EntityRef,
        seqs: &[i64],
        peek_lock: bool,
        owner: LinkId,
    ) -> Result<Vec<Received>, SbError> {
        let now = self.clock.now_ms();
        let mut guard = self.lock();
        let state = &mut *guard;
        let q = queue_mut(&mut state.queues, e)?;
        let lock_ms = q.lock_ms();
        let name = q.cfg.name.clone();
        let map = q.map(e.dlq);
        let mut out = Vec::new();
        for seq in seqs {
            let Some(live) = map.get_mut(seq).filter(|l| l.m.state == MsgState::Deferred) else {
                return Err(SbError::MessageNotFound(format!(
                    "no deferred message with sequence number {seq}"
                )));
            };
            if live.lock.as_ref().is_some_and(|l| l.until_ms > now) {
                return Err(SbError::NotAllowed(format!(
                    "deferred message {seq} is already locked"
                )));
            }
            if peek_lock {
                let token = Uuid::new_v4();
                let until_ms = now + lock_ms;
                live.lock = Some(Lock {
                    token,
                    until_ms,
                    owner,
                });
                state.locks.insert(token, (name.clone(), e.dlq, *seq));
                out.push(Received {
                    token: Some(token),
                    seq: *seq,
                    bytes: render(&live.m, Some((token, until_ms)), false)?,
                });
            } else {
                let bytes = render(&live.m, None, false)?;
                state.store.delete(&name, *seq)?;
                map.remove(seq);
                out.push(Received {
                    token: None,
                    seq: *seq,
                    bytes,
                });
            }
        }
        Ok(out)
    }

    /// How many messages the queue, subscription or dead-letter sub-queue holds, by state.
    pub fn counts(&self, e: &EntityRef) -> Result<Counts, SbError> {
        let mut guard = self.lock();
        let q = queue_mut(&mut guard.queues, e)?;
        let (map, dead_lettered) = if e.dlq {
            (&q.dlq, 0)
        } else {
            (&q.active, q.dlq.len())
        };
        let mut c = Counts {
            dead_lettered,
            ..Counts::default()
        };
        for live in map.values() {
            match live.m.state {
                MsgState::Active if live.lock.is_some() => c.locked += 1,
                MsgState::Active => c.active += 1,
                MsgState::Deferred => c.deferred += 1,
                MsgState::Scheduled => c.scheduled += 1,
            }
        }
        Ok(c)
    }
}

/// Message counts of one queue, for tests and tooling that wait until a queue is drained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Available to receivers now.
    pub active: usize,
    /// Under a peek-lock.
    pub locked: usize,
    /// Deferred (reachable by sequence number only).
    pub deferred: usize,
    /// Waiting for their scheduled time.
    pub scheduled: usize,
    /// In the dead-letter sub-queue.
    pub dead_lettered: usize,
}
