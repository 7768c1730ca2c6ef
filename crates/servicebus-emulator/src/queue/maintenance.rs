//! Releasing a closed link's holdings, and the periodic sweep (locks, schedule, TTL).

use super::*;

impl Namespace {
    /// Releases what a closing link holds: its session locks, and the message locks inside
    /// those sessions (without counting a failed delivery, §7).
    pub fn release_link(&self, owner: LinkId) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut freed = false;
        for q in state.queues.values_mut() {
            let before = q.session_locks.len();
            q.session_locks.retain(|_, l| l.owner != owner);
            if q.session_locks.len() == before || !q.cfg.requires_session {
                continue;
            }
            freed = true;
            for live in q.active.values_mut() {
                if let Some(lock) = live.lock.take_if(|l| l.owner == owner) {
                    state.locks.remove(&lock.token);
                }
            }
        }
        drop(guard);
        if freed {
            self.notify();
        }
    }

    /// Periodic work: lock expiry, scheduled messages, TTL, session locks, dedupe history.
    pub fn sweep(&self) -> Result<(), SbError> {
        let now = self.clock.now_ms();
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut changed = false;
        let mut to_dead_letter: Vec<(String, StoredMessage, &'static str, String)> = Vec::new();
        for t in state.topics.values_mut() {
            t.prune(now);
        }
        for q in state.queues.values_mut() {
            let window = millis(q.cfg.duplicate_window);
            let remembered = q.dedupe.len();
            q.dedupe.retain(|_, t| now - *t < window);
            if q.dedupe.len() != remembered {
                state.store.prune_dedupe(&q.cfg.name, now - window)?;
            }
            let before = q.session_locks.len();
            q.session_locks.retain(|_, l| l.until_ms > now);
            changed |= q.session_locks.len() != before;
            let max = q.cfg.max_delivery_count;
            let name = q.cfg.name.clone();
            let dl_on_expiry = q.cfg.dead_letter_on_expiration;
            for dlq in [false, true] {
                let mut remove = Vec::new();
                let session_locks = &q.session_locks;
                let in_sessions = q.cfg.requires_session && !dlq;
                let map = if dlq { &mut q.dlq } else { &mut q.active };
                for live in map.values_mut() {
                    let session = live.m.parts.session_id();
                    // A message of a session lives and lapses with its session lock (§7):
                    // when that lapses, every message its holder had locked goes back, counted,
                    // so the session's next holder starts again at the first of them.
                    let ran_out = |l: &mut Lock| {
                        if in_sessions {
                            !sessions::covered_by_session(session_locks, session, l, now)
                        } else {
                            l.until_ms <= now
                        }
                    };
                    if let Some(lock) = live.lock.take_if(ran_out) {
                        state.locks.remove(&lock.token);
                        live.m.delivery_count += 1;
                        changed = true;
                        if !dlq && live.m.delivery_count >= max {
                            remove.push(live.m.seq);
                            to_dead_letter.push((
                                name.clone(),
                                live.m.clone(),
                                "MaxDeliveryCountExceeded",
                                format!(
                                    "Message could not be consumed after {max} delivery attempts."
                                ),
                            ));
                            continue;
                        }
                        state.store.update(&live.m)?;
                    }
                    if live.m.state == MsgState::Scheduled && live.m.visible_ms <= now {
                        live.m.state = MsgState::Active;
                        state.store.update(&live.m)?;
                        changed = true;
                    }
                    let expired = !dlq
                        && live.lock.is_none()
                        && live.m.state == MsgState::Active
                        && live.m.expires_ms.is_some_and(|x| x <= now);
                    if expired {
                        remove.push(live.m.seq);
                        changed = true;
                        if dl_on_expiry {
                            to_dead_letter.push((
                                name.clone(),
                                live.m.clone(),
                                "TTLExpiredException",
                                "The message expired and was dead lettered.".into(),
                            ));
                        } else {
                            state.store.delete(&name, live.m.seq)?;
                        }
                    }
                }
                for seq in remove {
                    map.remove(&seq);
                }
            }
        }
        for (queue, m, reason, description) in to_dead_letter {
            dead_letter(state, &queue, m, reason, &description, now)?;
        }
        drop(guard);
        if changed {
            self.notify();
        }
        Ok(())
    }
}
