//! Session locks and session state (§3.4, §7).
//!
//! A message received under a session lock is covered by that lock, as on Service Bus: its own
//! lock neither runs out nor counts a failed delivery while its holder keeps the session, and
//! it is released with the session (`docs/servicebus-protocol.md` §7).

use super::*;

/// Whether `lock` (on a message of session `sid`) is covered by a session lock its holder still
/// has: such a message lock does not run out on its own.
pub(super) fn covered_by_session(
    session_locks: &HashMap<String, SessionLock>,
    sid: Option<&str>,
    lock: &Lock,
    now: i64,
) -> bool {
    sid.and_then(|sid| session_locks.get(sid))
        .is_some_and(|s| s.owner == lock.owner && s.until_ms > now)
}

impl Namespace {
    /// Locks a session for `owner`: the named one, or the first one with available messages.
    /// `Ok(None)` means no session is free right now.
    pub fn lock_session(
        &self,
        e: &EntityRef,
        requested: Option<&str>,
        owner: LinkId,
    ) -> Result<Option<(String, i64)>, SbError> {
        let now = self.clock.now_ms();
        let mut guard = self.lock();
        let q = queue_mut(&mut guard.queues, e)?;
        let lock_ms = q.lock_ms();
        let free = |q: &Queue, sid: &str| {
            q.session_locks
                .get(sid)
                .is_none_or(|l| l.until_ms <= now || l.owner == owner)
        };
        let sid = match requested {
            Some(sid) => {
                if !free(q, sid) {
                    return Err(SbError::SessionCannotBeLocked(sid.to_string()));
                }
                sid.to_string()
            }
            None => {
                let found = q
                    .active
                    .values()
                    .filter(|l| {
                        l.lock.is_none() && l.m.state == MsgState::Active && l.m.visible_ms <= now
                    })
                    .filter_map(|l| l.m.parts.session_id())
                    .find(|sid| free(q, sid))
                    .map(str::to_string);
                match found {
                    Some(sid) => sid,
                    None => return Ok(None),
                }
            }
        };
        let until_ms = now + lock_ms;
        q.session_locks
            .insert(sid.clone(), SessionLock { owner, until_ms });
        Ok(Some((sid, until_ms)))
    }

    /// Whether `owner` still holds the session lock.
    pub fn holds_session(&self, e: &EntityRef, sid: &str, owner: LinkId) -> bool {
        let now = self.clock.now_ms();
        let guard = self.lock();
        guard
            .queues
            .get(&e.queue.to_ascii_lowercase())
            .and_then(|q| q.session_locks.get(sid))
            .is_some_and(|l| l.owner == owner && l.until_ms > now)
    }

    /// Renews a held session lock; returns the new expiry.
    pub fn renew_session_lock(&self, e: &EntityRef, sid: &str) -> Result<i64, SbError> {
        let now = self.clock.now_ms();
        let mut guard = self.lock();
        let q = queue_mut(&mut guard.queues, e)?;
        let lock_ms = q.lock_ms();
        let lock = q
            .session_locks
            .get_mut(sid)
            .filter(|l| l.until_ms > now)
            .ok_or(SbError::SessionLockLost)?;
        lock.until_ms = now + lock_ms;
        Ok(lock.until_ms)
    }

    /// Session state bytes, if set.
    pub fn session_state(&self, e: &EntityRef, sid: &str) -> Result<Option<Vec<u8>>, SbError> {
        let mut guard = self.lock();
        let q = queue_mut(&mut guard.queues, e)?;
        Ok(q.session_state.get(sid).map(|(s, _)| s.clone()))
    }

    /// Sets (or clears with `None`) session state, durably.
    pub fn set_session_state(
        &self,
        e: &EntityRef,
        sid: &str,
        value: Option<Vec<u8>>,
    ) -> Result<(), SbError> {
        let now = self.clock.now_ms();
        let mut guard = self.lock();
        let state = &mut *guard;
        let q = queue_mut(&mut state.queues, e)?;
        state
            .store
            .set_session_state(&q.cfg.name, sid, value.as_deref(), now)?;
        match value {
            Some(v) => q.session_state.insert(sid.to_string(), (v, now)),
            None => q.session_state.remove(sid),
        };
        Ok(())
    }

    /// Ids of sessions, sorted. With `state_updated_after`, only sessions whose state was
    /// set after that time; otherwise every session that has messages or state.
    pub fn list_sessions(
        &self,
        e: &EntityRef,
        state_updated_after: Option<i64>,
    ) -> Result<Vec<String>, SbError> {
        let mut guard = self.lock();
        let q = queue_mut(&mut guard.queues, e)?;
        let mut ids: Vec<String> = match state_updated_after {
            Some(after) => q
                .session_state
                .iter()
                .filter(|(_, (_, updated))| *updated > after)
                .map(|(sid, _)| sid.clone())
                .collect(),
            None => q
                .active
                .values()
                .filter_map(|l| l.m.parts.session_id().map(str::to_string))
                .chain(q.session_state.keys().cloned())
                .collect(),
        };
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}
