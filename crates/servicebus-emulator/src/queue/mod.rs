//! Queue semantics (§4, §5.2, §7): sequence numbers, peek-lock, delivery counts, TTL,
//! scheduling, deferral, duplicate detection and the dead-letter sub-queue.
//!
//! The in-memory maps are the working copy; every change a client may rely on is written to
//! the [`Store`] before the call returns (see the crash-ordering rules in `store.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use fe2o3_amqp_types::primitives::{SimpleValue, Timestamp, Value};
use tokio::sync::watch;
use uuid::Uuid;

mod maintenance;
mod sequence;
mod sessions;
mod topic;

pub use sequence::Counts;

use super::clock::{Clock, SystemClock};
use super::entities::{Entities, QueueConfig};
use super::error::SbError;
use super::message::MessageParts;
use super::store::{MsgState, Store, StoredMessage};

/// Identifies a receiving link, so locks and session locks know their holder.
pub type LinkId = u64;

/// A queue or its dead-letter sub-queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntityRef {
    /// Configured queue name.
    pub queue: String,
    /// The `$DeadLetterQueue` sub-queue.
    pub dlq: bool,
}

impl EntityRef {
    /// The entity path as clients write it.
    pub fn path(&self) -> String {
        if self.dlq {
            format!("{}/$DeadLetterQueue", self.queue)
        } else {
            self.queue.clone()
        }
    }
}

/// The kinds of entity, for deciding which links they take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntityKind {
    /// Send and receive.
    Queue,
    /// Send only.
    Topic,
    /// Receive only.
    Subscription,
}

/// What the client decided about a locked message (§5.1).
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// Delete it.
    Complete,
    /// Unlock without counting a failed delivery.
    Release,
    /// Unlock and count a failed delivery.
    Abandon(Vec<(String, SimpleValue)>),
    /// Set aside; reachable only by sequence number.
    Defer(Vec<(String, SimpleValue)>),
    /// Move to the dead-letter sub-queue.
    DeadLetter {
        /// `DeadLetterReason`.
        reason: Option<String>,
        /// `DeadLetterErrorDescription`.
        description: Option<String>,
        /// Extra user properties.
        props: Vec<(String, SimpleValue)>,
    },
}

/// A message handed to a receiver.
#[derive(Debug, Clone)]
pub struct Received {
    /// Lock token; `None` when the message was deleted on delivery.
    pub token: Option<Uuid>,
    /// Sequence number.
    pub seq: i64,
    /// The encoded message with broker annotations.
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Lock {
    token: Uuid,
    until_ms: i64,
    owner: LinkId,
}

#[derive(Debug)]
struct Entry {
    m: StoredMessage,
    lock: Option<Lock>,
}

#[derive(Debug, Clone)]
struct SessionLock {
    owner: LinkId,
    until_ms: i64,
}

#[derive(Debug)]
struct Queue {
    cfg: QueueConfig,
    next_seq: i64,
    active: BTreeMap<i64, Entry>,
    dlq: BTreeMap<i64, Entry>,
    dedupe: HashMap<String, i64>,
    /// Session state and when it was last set (Unix ms).
    session_state: HashMap<String, (Vec<u8>, i64)>,
    session_locks: HashMap<String, SessionLock>,
    /// A topic's subscription: receive only, fed by its topic.
    subscription: bool,
}

impl Queue {
    /// Numbers and stamps new messages (session check, schedule, TTL); stores nothing.
    fn prepare(
        &self,
        msgs: Vec<MessageParts>,
        now: i64,
        next_seq: &mut i64,
    ) -> Result<Vec<StoredMessage>, SbError> {
        let mut stored = Vec::with_capacity(msgs.len());
        for mut parts in msgs {
            parts.ensure_message_id();
            if self.cfg.requires_session && parts.session_id().is_none() {
                return Err(SbError::NotAllowed(format!(
                    "{} requires a session id on every message",
                    self.cfg.name
                )));
            }
            let visible_ms = parts.scheduled_enqueue_ms().unwrap_or(now).max(now);
            let default_ttl = millis(self.cfg.default_ttl);
            let ttl = parts
                .ttl_ms()
                .map(|t| i64::from(t).min(default_ttl))
                .unwrap_or(default_ttl);
            stored.push(StoredMessage {
                queue: self.cfg.name.clone(),
                dlq: false,
                seq: *next_seq,
                parts,
                enqueued_ms: now,
                delivery_count: 0,
                state: if visible_ms > now {
                    MsgState::Scheduled
                } else {
                    MsgState::Active
                },
                visible_ms,
                expires_ms: visible_ms.checked_add(ttl),
            });
            *next_seq += 1;
        }
        Ok(stored)
    }

    /// Refuses `incoming` when the queue and its dead letters would then hold more than
    /// `MaxSizeInMegabytes` (message bodies counted).
    fn check_quota(&self, incoming: &[StoredMessage]) -> Result<(), SbError> {
        let size = |m: &StoredMessage| (m.parts.body.len() + m.parts.footer.len()) as u64;
        let held: u64 = self
            .active
            .values()
            .chain(self.dlq.values())
            .map(|l| size(&l.m))
            .sum();
        let adding: u64 = incoming.iter().map(size).sum();
        if held.saturating_add(adding) <= self.cfg.max_size_bytes {
            return Ok(());
        }
        Err(SbError::QuotaExceeded(format!(
            "the maximum entity size has been reached for queue {}: it holds {held} bytes of \
             {} (MaxSizeInMegabytes), and this send adds {adding}",
            self.cfg.name, self.cfg.max_size_bytes
        )))
    }

    fn map(&mut self, dlq: bool) -> &mut BTreeMap<i64, Entry> {
        if dlq { &mut self.dlq } else { &mut self.active }
    }
    fn lock_ms(&self) -> i64 {
        millis(self.cfg.lock_duration)
    }
}

#[derive(Debug)]
struct State {
    queues: HashMap<String, Queue>,
    topics: HashMap<String, topic::Topic>,
    locks: HashMap<Uuid, (String, bool, i64)>,
    store: Store,
}

/// The broker: all queues of the namespace, shared by every connection.
#[derive(Debug)]
pub struct Namespace {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
}

/// A duration in milliseconds, saturating (an "unlimited" TTL is `Duration::MAX`).
fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Current system time in Unix milliseconds (token expiry and other non-queue uses).
pub fn now_ms() -> i64 {
    SystemClock.now_ms()
}

impl Namespace {
    /// Builds the broker from queue definitions and whatever the store holds.
    pub fn new(queues: Vec<QueueConfig>, store: Store) -> Result<Namespace, SbError> {
        Namespace::with_clock(queues, store, Arc::new(SystemClock))
    }

    /// Like [`Namespace::new`] with another clock (tests move time instead of sleeping).
    pub fn with_clock(
        queues: Vec<QueueConfig>,
        store: Store,
        clock: Arc<dyn Clock>,
    ) -> Result<Namespace, SbError> {
        let entities = Entities {
            queues,
            topics: Vec::new(),
        };
        Namespace::with_entities(entities, store, clock)
    }

    /// Builds the broker for queues and topics (each subscription becomes a receive-only queue).
    pub fn with_entities(
        entities: Entities,
        store: Store,
        clock: Arc<dyn Clock>,
    ) -> Result<Namespace, SbError> {
        let mut map = HashMap::new();
        let mut topics = HashMap::new();
        let subscriptions = entities
            .topics
            .iter()
            .flat_map(|t| t.subscriptions.iter().map(|s| (s.queue.clone(), true)));
        let queues = entities.queues.into_iter().map(|q| (q, false));
        for (cfg, subscription) in queues.chain(subscriptions) {
            let next_seq = store.next_seq(&cfg.name)?;
            map.insert(
                cfg.name.to_ascii_lowercase(),
                Queue {
                    cfg,
                    next_seq,
                    active: BTreeMap::new(),
                    dlq: BTreeMap::new(),
                    dedupe: HashMap::new(),
                    session_state: HashMap::new(),
                    session_locks: HashMap::new(),
                    subscription,
                },
            );
        }
        for cfg in entities.topics {
            let next_seq = store.next_seq(&cfg.name)?;
            topics.insert(
                cfg.name.to_ascii_lowercase(),
                topic::Topic::new(cfg, next_seq),
            );
        }
        for m in store.load()? {
            if let Some(q) = map.get_mut(&m.queue.to_ascii_lowercase()) {
                q.next_seq = q.next_seq.max(m.seq + 1);
                let dlq = m.dlq;
                q.map(dlq).insert(m.seq, Entry { m, lock: None });
            } else {
                tracing::warn!(queue = %m.queue, seq = m.seq, "Stored message belongs to a queue that is no longer configured; it is kept but unreachable.");
            }
        }
        for t in topics.values_mut() {
            t.catch_up(&map);
        }
        for (queue, id, seen_ms) in store.load_dedupe()? {
            if let Some(q) = map.get_mut(&queue.to_ascii_lowercase()) {
                q.dedupe.insert(id, seen_ms);
            }
        }
        for (queue, session, state, updated) in store.load_session_states()? {
            if let Some(q) = map.get_mut(&queue.to_ascii_lowercase()) {
                q.session_state.insert(session, (state, updated));
            }
        }
        let (changed, _) = watch::channel(0);
        Ok(Namespace {
            state: Mutex::new(State {
                queues: map,
                topics,
                locks: HashMap::new(),
                store,
            }),
            changed,
            clock,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver of "something changed" signals, used to wake links that have credit.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Resolves a link address (bare path or absolute URI, any case) to an entity.
    pub fn resolve(&self, address: &str) -> Option<EntityRef> {
        let path = strip_authority(address)
            .trim_matches('/')
            .to_ascii_lowercase();
        let (queue, dlq) = match path.strip_suffix("/$deadletterqueue") {
            Some(q) => (q.to_string(), true),
            None => (path, false),
        };
        let state = self.lock();
        if let Some(t) = state.topics.get(&queue) {
            return (!dlq).then(|| EntityRef {
                queue: t.name().to_string(),
                dlq: false,
            });
        }
        let q = state.queues.get(&queue)?;
        Some(EntityRef {
            queue: q.cfg.name.clone(),
            dlq,
        })
    }

    /// What kind of entity `e` is, which decides the link directions it allows.
    pub fn kind(&self, e: &EntityRef) -> EntityKind {
        let state = self.lock();
        let key = e.queue.to_ascii_lowercase();
        if state.topics.contains_key(&key) {
            EntityKind::Topic
        } else if state.queues.get(&key).is_some_and(|q| q.subscription) {
            EntityKind::Subscription
        } else {
            EntityKind::Queue
        }
    }

    /// Whether the queue requires sessions.
    pub fn requires_session(&self, e: &EntityRef) -> bool {
        let state = self.lock();
        state
            .queues
            .get(&e.queue.to_ascii_lowercase())
            .is_some_and(|q| q.cfg.requires_session && !e.dlq)
    }

    /// Enqueues messages (a batch is already unpacked). Returns the sequence numbers given;
    /// duplicates are accepted and dropped (§7), so they get none.
    pub fn enqueue(&self, e: &EntityRef, msgs: Vec<MessageParts>) -> Result<Vec<i64>, SbError> {
        if e.dlq {
            return Err(SbError::NotAllowed(
                "messages cannot be sent to a dead-letter queue".into(),
            ));
        }
        let now = self.clock.now_ms();
        let mut guard = self.lock();
        let state = &mut *guard;
        let key = e.queue.to_ascii_lowercase();
        if state.topics.contains_key(&key) {
            let seqs = topic::fan_out(state, &key, msgs, now)?;
            drop(guard);
            self.notify();
            return Ok(seqs);
        }
        let addressed = queue_mut(&mut state.queues, e)?;
        if addressed.subscription {
            return Err(SbError::NotAllowed(
                "messages cannot be sent to a subscription; send them to its topic".into(),
            ));
        }
        let key = final_queue(&state.queues, &key);
        let q = state
            .queues
            .get_mut(&key)
            .ok_or_else(|| SbError::EntityNotFound(key.clone()))?;
        let window = millis(q.cfg.duplicate_window);
        let (msgs, seen_now) = if q.cfg.duplicate_detection {
            dedupe(&q.dedupe, window, now, msgs)
        } else {
            (msgs, Vec::new())
        };
        let mut next_seq = q.next_seq;
        let stored = q.prepare(msgs, now, &mut next_seq)?;
        q.check_quota(&stored)?;
        state.store.insert_remembering(
            &q.cfg.name,
            next_seq,
            &stored.iter().collect::<Vec<_>>(),
            &seen_now,
            now,
        )?;
        q.next_seq = next_seq;
        for id in seen_now {
            q.dedupe.insert(id, now);
        }
        let seqs = stored.iter().map(|m| m.seq).collect();
        for m in stored {
            q.active.insert(m.seq, Entry { m, lock: None });
        }
        drop(guard);
        self.notify();
        Ok(seqs)
    }

    /// Takes the next available message for a receiver: locks it (peek-lock) or deletes it
    /// (receive-and-delete). `session` restricts it to one session's messages.
    pub fn acquire(
        &self,
        e: &EntityRef,
        session: Option<&str>,
        owner: LinkId,
        peek_lock: bool,
    ) -> Result<Option<Received>, SbError> {
        let now = self.clock.now_ms();
        let mut guard = self.lock();
        let state = &mut *guard;
        let q = queue_mut(&mut state.queues, e)?;
        let session_queue = q.cfg.requires_session && !e.dlq;
        let lock_ms = q.lock_ms();
        let name = q.cfg.name.clone();
        let map = q.map(e.dlq);
        let mut candidates = map.values().filter(|l| {
            l.m.state == MsgState::Active
                && l.m.visible_ms <= now
                && (e.dlq || l.m.expires_ms.is_none_or(|x| x > now))
                && (!session_queue || l.m.parts.session_id() == session)
        });
        let next = if session_queue {
            // In order inside a session: the holder's next message is the first it has not
            // taken yet. One still locked by an earlier holder (its session lock lapsed, the
            // sweep has not yet given it back) holds the session's later messages back.
            candidates
                .find(|l| l.lock.as_ref().is_none_or(|lock| lock.owner != owner))
                .filter(|l| l.lock.is_none())
        } else {
            candidates.find(|l| l.lock.is_none())
        };
        let Some(seq) = next.map(|l| l.m.seq) else {
            return Ok(None);
        };
        if peek_lock {
            let token = Uuid::new_v4();
            let until_ms = now + lock_ms;
            let Some(live) = map.get_mut(&seq) else {
                return Ok(None);
            };
            live.lock = Some(Lock {
                token,
                until_ms,
                owner,
            });
            let bytes = render(&live.m, Some((token, until_ms)), false)?;
            state.locks.insert(token, (name, e.dlq, seq));
            Ok(Some(Received {
                token: Some(token),
                seq,
                bytes,
            }))
        } else {
            state.store.delete(&name, seq)?;
            let Some(live) = map.remove(&seq) else {
                return Ok(None);
            };
            Ok(Some(Received {
                token: None,
                seq,
                bytes: render(&live.m, None, false)?,
            }))
        }
    }

    /// Applies a client's outcome to the message locked under `token`.
    pub fn settle(&self, token: Uuid, outcome: Settlement) -> Result<(), SbError> {
        let now = self.clock.now_ms();
        let mut guard = self.lock();
        let state = &mut *guard;
        let (queue, dlq, seq) = state.locks.get(&token).cloned().ok_or(SbError::LockLost)?;
        let q = state
            .queues
            .get_mut(&queue.to_ascii_lowercase())
            .ok_or_else(|| SbError::EntityNotFound(queue.clone()))?;
        let max = q.cfg.max_delivery_count;
        let session_locks = &q.session_locks;
        let map = if dlq { &mut q.dlq } else { &mut q.active };
        let current = map
            .get(&seq)
            .filter(|live| {
                live.lock.as_ref().is_some_and(|l| {
                    l.token == token
                        && (l.until_ms > now
                            || outcome == Settlement::Release
                            || (!dlq
                                && sessions::covered_by_session(
                                    session_locks,
                                    live.m.parts.session_id(),
                                    l,
                                    now,
                                )))
                })
            })
            .map(|l| l.m.clone());
        let Some(mut m) = current else {
            return Err(SbError::LockLost);
        };
        match outcome {
            Settlement::Complete => {
                state.store.delete(&queue, seq)?;
                map.remove(&seq);
            }
            Settlement::Release => put_back(state, m),
            Settlement::Abandon(props) => {
                merge_props(&mut m.parts, props);
                m.delivery_count += 1;
                if !dlq && m.delivery_count >= max {
                    let why =
                        format!("Message could not be consumed after {max} delivery attempts.");
                    dead_letter(state, &queue, m, "MaxDeliveryCountExceeded", &why, now)?;
                } else {
                    state.store.update(&m)?;
                    put_back(state, m);
                }
            }
            Settlement::Defer(props) => {
                merge_props(&mut m.parts, props);
                m.state = MsgState::Deferred;
                state.store.update(&m)?;
                put_back(state, m);
            }
            Settlement::DeadLetter {
                reason,
                description,
                props,
            } => {
                if dlq {
                    return Err(SbError::NotAllowed(
                        "a dead-lettered message cannot be dead-lettered again".into(),
                    ));
                }
                merge_props(&mut m.parts, props);
                let reason = reason.unwrap_or_default();
                let description = description.unwrap_or_default();
                dead_letter(state, &queue, m, &reason, &description, now)?;
            }
        }
        state.locks.remove(&token);
        drop(guard);
        self.notify();
        Ok(())
    }
}

fn queue_mut<'a>(
    queues: &'a mut HashMap<String, Queue>,
    e: &EntityRef,
) -> Result<&'a mut Queue, SbError> {
    queues
        .get_mut(&e.queue.to_ascii_lowercase())
        .ok_or_else(|| SbError::EntityNotFound(e.path()))
}

/// Moves a message (already removed from, or about to replace its slot in, the active map)
/// into the dead-letter sub-queue with its reason.
fn dead_letter(
    state: &mut State,
    queue: &str,
    mut m: StoredMessage,
    reason: &str,
    description: &str,
    now: i64,
) -> Result<(), SbError> {
    m.parts
        .set_app_prop("DeadLetterReason", SimpleValue::String(reason.to_string()));
    m.parts.set_app_prop(
        "DeadLetterErrorDescription",
        SimpleValue::String(description.to_string()),
    );
    let source_key = queue.to_ascii_lowercase();
    let forward = state
        .queues
        .get(&source_key)
        .and_then(|q| q.cfg.forward_dead_letters_to.as_deref())
        .map(|t| final_queue(&state.queues, &t.to_ascii_lowercase()));
    if let Some(dest_key) = forward {
        return forward_dead_letter(state, &source_key, &dest_key, m, now);
    }
    m.dlq = true;
    m.state = MsgState::Active;
    state.store.update(&m)?;
    if let Some(q) = state.queues.get_mut(&source_key) {
        q.active.remove(&m.seq);
        q.dlq.insert(m.seq, Entry { m, lock: None });
    }
    Ok(())
}

/// `ForwardDeadLetteredMessagesTo`: the dead letter becomes a new message in `dest_key`. The
/// copy is committed before the original is deleted, so a crash in between duplicates it
/// rather than losing it.
fn forward_dead_letter(
    state: &mut State,
    source_key: &str,
    dest_key: &str,
    m: StoredMessage,
    now: i64,
) -> Result<(), SbError> {
    let mut parts = m.parts.clone();
    parts.set_annotation("x-opt-deadletter-source", Value::String(m.queue.clone()));
    let dest = state
        .queues
        .get_mut(dest_key)
        .ok_or_else(|| SbError::EntityNotFound(dest_key.to_string()))?;
    let mut next = dest.next_seq;
    let copies = dest.prepare(vec![parts], now, &mut next)?;
    state
        .store
        .insert(&dest.cfg.name, next, &copies.iter().collect::<Vec<_>>())?;
    dest.next_seq = next;
    for c in copies {
        dest.active.insert(c.seq, Entry { m: c, lock: None });
    }
    state.store.delete(&m.queue, m.seq)?;
    if let Some(q) = state.queues.get_mut(source_key) {
        q.active.remove(&m.seq);
    }
    Ok(())
}

/// Follows `ForwardTo` from queue `key` to the queue that keeps messages (chains were
/// checked for loops when the entities were loaded; the bound is a second guard).
fn final_queue(queues: &HashMap<String, Queue>, key: &str) -> String {
    let mut key = key.to_string();
    for _ in 0..16 {
        match queues.get(&key).and_then(|q| q.cfg.forward_to.as_deref()) {
            Some(next) => key = next.to_ascii_lowercase(),
            None => break,
        }
    }
    key
}

/// Gives every message a message-id, then drops those whose id was seen within `window`
/// (§7: duplicates are accepted and silently dropped). Returns the kept messages and the new
/// ids to remember.
fn dedupe(
    seen: &HashMap<String, i64>,
    window: i64,
    now: i64,
    msgs: Vec<MessageParts>,
) -> (Vec<MessageParts>, Vec<String>) {
    let mut kept = Vec::with_capacity(msgs.len());
    let mut new_ids: Vec<String> = Vec::new();
    for mut m in msgs {
        m.ensure_message_id();
        if let Some(id) = m.message_id_text() {
            let dup = seen.get(&id).is_some_and(|t| now - t < window) || new_ids.contains(&id);
            if dup {
                continue;
            }
            new_ids.push(id);
        }
        kept.push(m);
    }
    (kept, new_ids)
}

/// Puts an updated message back in its slot, unlocked.
fn put_back(state: &mut State, m: StoredMessage) {
    if let Some(q) = state.queues.get_mut(&m.queue.to_ascii_lowercase()) {
        let dlq = m.dlq;
        q.map(dlq).insert(m.seq, Entry { m, lock: None });
    }
}

fn merge_props(parts: &mut MessageParts, props: Vec<(String, SimpleValue)>) {
    for (k, v) in props {
        parts.set_app_prop(&k, v);
    }
}

/// Encodes a message for delivery or peek with the broker's header and annotations.
/// `lock` is the lock token and its expiry for peek-lock deliveries; the token also goes into
/// the `x-opt-lock-token` delivery annotation for clients that read it there (§4.2).
fn render(m: &StoredMessage, lock: Option<(Uuid, i64)>, peek: bool) -> Result<Vec<u8>, SbError> {
    let mut parts = m.parts.clone();
    parts.set_delivery_count(m.delivery_count);
    parts.set_annotation("x-opt-sequence-number", Value::Long(m.seq));
    parts.set_annotation(
        "x-opt-enqueued-time",
        Value::Timestamp(Timestamp::from_milliseconds(m.enqueued_ms)),
    );
    if let Some((token, until)) = lock {
        parts.set_annotation(
            "x-opt-locked-until",
            Value::Timestamp(Timestamp::from_milliseconds(until)),
        );
        parts.set_lock_token(token);
    }
    if peek || m.state != MsgState::Active {
        parts.set_annotation("x-opt-message-state", Value::Int(m.state as i32));
    }
    if m.dlq {
        parts.set_annotation("x-opt-deadletter-source", Value::String(m.queue.clone()));
    }
    parts.set_absolute_expiry(m.expires_ms);
    parts.encode().map_err(|e| {
        SbError::Store(super::store::StoreError::Corrupt {
            queue: m.queue.clone(),
            seq: m.seq,
            reason: e.to_string(),
        })
    })
}

/// Drops `scheme://authority/` from an address (Python sends absolute URIs, §3.1).
pub fn strip_authority(address: &str) -> &str {
    match address.find("://") {
        Some(i) => {
            let rest = &address[i + 3..];
            rest.find('/').map(|j| &rest[j..]).unwrap_or("")
        }
        None => address,
    }
}
