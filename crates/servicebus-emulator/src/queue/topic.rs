//! Topics: a sent message is copied into every subscription whose rules match (§7). The
//! copies share the topic's sequence number, so `cancel-scheduled-message` on the topic finds
//! them all; they are committed in one transaction, so a restart sees all copies or none.

use std::collections::HashMap;

use super::*;
use crate::entities::TopicConfig;

/// A topic's running state.
#[derive(Debug)]
pub(super) struct Topic {
    cfg: TopicConfig,
    next_seq: i64,
    dedupe: HashMap<String, i64>,
}

impl Topic {
    pub(super) fn new(cfg: TopicConfig, next_seq: i64) -> Topic {
        Topic {
            cfg,
            next_seq,
            dedupe: HashMap::new(),
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Keeps sequence numbers rising past every stored copy.
    pub(super) fn catch_up(&mut self, queues: &HashMap<String, Queue>) {
        for sub in &self.cfg.subscriptions {
            if let Some(q) = queues.get(&sub.queue.name.to_ascii_lowercase()) {
                let last = q.active.keys().chain(q.dlq.keys()).max().copied();
                if let Some(last) = last {
                    self.next_seq = self.next_seq.max(last + 1);
                }
            }
        }
    }

    fn subscription_keys(&self) -> Vec<String> {
        self.cfg
            .subscriptions
            .iter()
            .map(|s| s.queue.name.to_ascii_lowercase())
            .collect()
    }

    pub(super) fn prune(&mut self, now: i64) {
        let window = millis(self.cfg.duplicate_window);
        self.dedupe.retain(|_, t| now - *t < window);
    }
}

/// Copies `msgs` into the matching subscriptions of topic `key`; returns the topic sequence
/// numbers given.
pub(super) fn fan_out(
    state: &mut State,
    key: &str,
    msgs: Vec<MessageParts>,
    now: i64,
) -> Result<Vec<i64>, SbError> {
    let Some(topic) = state.topics.get_mut(key) else {
        return Err(SbError::EntityNotFound(key.to_string()));
    };
    let (msgs, seen) = if topic.cfg.duplicate_detection {
        dedupe(&topic.dedupe, millis(topic.cfg.duplicate_window), now, msgs)
    } else {
        let mut msgs = msgs;
        msgs.iter_mut().for_each(MessageParts::ensure_message_id);
        (msgs, Vec::new())
    };
    let first_seq = topic.next_seq;
    let end_seq = first_seq + msgs.len() as i64;
    // Copies for a subscription that forwards go to the final queue, numbered by it.
    let mut copies: Vec<(String, Option<i64>, Vec<StoredMessage>)> = Vec::new();
    for sub in &topic.cfg.subscriptions {
        let skey = sub.queue.name.to_ascii_lowercase();
        let dest_key = match sub.queue.forward_to.as_deref() {
            Some(t) => final_queue(&state.queues, &t.to_ascii_lowercase()),
            None => skey.clone(),
        };
        let forwarded = dest_key != skey;
        let Some(q) = state.queues.get(&dest_key) else {
            continue;
        };
        let mut own_next = copies
            .iter()
            .rev()
            .find(|(k, n, _)| *k == dest_key && n.is_some())
            .and_then(|(_, n, _)| *n)
            .unwrap_or(q.next_seq);
        let mut stored = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let pass = sub.rules.is_empty() || sub.rules.iter().any(|r| r.matches(m));
            if !pass {
                continue;
            }
            if forwarded {
                stored.extend(q.prepare(vec![m.clone()], now, &mut own_next)?);
            } else {
                let mut seq = first_seq + i as i64;
                stored.extend(q.prepare(vec![m.clone()], now, &mut seq)?);
            }
        }
        if !stored.is_empty() {
            copies.push((dest_key, forwarded.then_some(own_next), stored));
        }
    }
    let topic_name = topic.cfg.name.clone();
    let batches: Vec<(&str, Option<i64>, Vec<&StoredMessage>)> =
        std::iter::once((topic_name.as_str(), Some(end_seq), Vec::new()))
            .chain(copies.iter().map(|(k, next, ms)| {
                let name = ms.first().map(|m| m.queue.as_str()).unwrap_or(k.as_str());
                (name, *next, ms.iter().collect())
            }))
            .collect();
    state.store.insert_batches(&batches)?;
    if let Some(topic) = state.topics.get_mut(key) {
        topic.next_seq = end_seq;
        for id in seen {
            topic.dedupe.insert(id, now);
        }
    }
    for (skey, next, stored) in copies {
        if let Some(q) = state.queues.get_mut(&skey) {
            if let Some(next) = next {
                q.next_seq = q.next_seq.max(next);
            }
            for m in stored {
                q.active.insert(m.seq, Entry { m, lock: None });
            }
        }
    }
    Ok((first_seq..end_seq).collect())
}

/// Cancels scheduled copies by topic sequence number in every subscription.
pub(super) fn cancel(state: &mut State, key: &str, seqs: &[i64]) -> Result<(), SbError> {
    let Some(topic) = state.topics.get(key) else {
        return Err(SbError::EntityNotFound(key.to_string()));
    };
    let subs = topic.subscription_keys();
    for seq in seqs {
        let mut found = false;
        for skey in &subs {
            let Some(q) = state.queues.get_mut(skey) else {
                continue;
            };
            if q.active
                .get(seq)
                .is_some_and(|l| l.m.state == MsgState::Scheduled)
            {
                state.store.delete(&q.cfg.name, *seq)?;
                q.active.remove(seq);
                found = true;
            }
        }
        if !found {
            return Err(SbError::MessageNotFound(format!(
                "no scheduled message with sequence number {seq}"
            )));
        }
    }
    Ok(())
}
