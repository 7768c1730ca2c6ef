//! Durable message store on SQLite (WAL, `synchronous=FULL`).
//!
//! # Crash-ordering rules
//! 1. **Enqueue:** a sender's transfer is settled with `accepted` only after the transaction
//!    that inserts its message(s) and the queue's next sequence number has committed. A crash
//!    before the commit loses a message the client never saw accepted (it retries); a crash
//!    after it keeps the message.
//! 2. **Complete / dead-letter / defer / abandon:** the new state is committed before the
//!    settled disposition (or management 200) goes back. A crash in between leaves the old
//!    state, so the message is delivered again: at-least-once, never lost.
//! 3. **Receive-and-delete:** the delete commits before the transfer is written, so a crash can
//!    lose that one message, which is what the mode promises.
//! 4. **Locks are not stored.** After a restart every message is unlocked; its delivery count
//!    is the last committed one.
//! 5. Sequence numbers never go back: `next_seq` is written in the same transaction as the
//!    messages that used it.
//!
//! `--in-memory` uses the same code on an in-memory SQLite database.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use thiserror::Error;

use super::message::MessageParts;

/// Why the store failed. The broker reports it to the client as a server error.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite refused an operation.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row does not decode (corrupt database).
    #[error("stored message {seq} of {queue} is corrupt: {reason}")]
    Corrupt {
        /// Queue name.
        queue: String,
        /// Sequence number.
        seq: i64,
        /// Decoder message.
        reason: String,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory: {0}")]
    Dir(std::io::Error),
    /// Another emulator has the data directory open.
    #[error("the data directory {0} is in use by another emulator (or `hybrid-worker run`)")]
    InUse(std::path::PathBuf),
    /// The store was written by a newer emulator whose schema this one does not know.
    #[error(
        "the store's schema is version {found}, newer than this emulator's {supported}: run the newer binary, or move the data directory away"
    )]
    NewerSchema {
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// What this binary writes.
        supported: i64,
    },
}

/// Lifecycle state of a message, stored as an integer (the values of `x-opt-message-state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgState {
    /// Can be received.
    Active = 0,
    /// Deferred: only `receive-by-sequence-number` reaches it.
    Deferred = 1,
    /// Scheduled: becomes active at `visible_ms`.
    Scheduled = 2,
}

impl MsgState {
    fn from_i64(n: i64) -> MsgState {
        match n {
            1 => MsgState::Deferred,
            2 => MsgState::Scheduled,
            _ => MsgState::Active,
        }
    }
}

/// A message as persisted.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Queue (configured name) it belongs to.
    pub queue: String,
    /// In the queue's dead-letter sub-queue.
    pub dlq: bool,
    /// Sequence number, unique per queue (a dead-lettered message keeps it).
    pub seq: i64,
    /// The client's sections (plus dead-letter properties).
    pub parts: MessageParts,
    /// Accept time, Unix ms.
    pub enqueued_ms: i64,
    /// Earlier failed deliveries.
    pub delivery_count: u32,
    /// Active, deferred or scheduled.
    pub state: MsgState,
    /// Scheduled enqueue time (Unix ms); equals `enqueued_ms` otherwise.
    pub visible_ms: i64,
    /// Expiry (Unix ms), if the message can expire.
    pub expires_ms: Option<i64>,
}

/// A stored session state: queue, session id, state bytes, last update (Unix ms).
pub type SessionStateRow = (String, String, Vec<u8>, i64);

/// The SQLite connection.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    /// An exclusive lock on the data directory while this store is open: two emulators on one
    /// directory would each believe they own its messages and deliver them twice.
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
  queue TEXT NOT NULL, seq INTEGER NOT NULL, dlq INTEGER NOT NULL, data BLOB NOT NULL,
  enqueued_ms INTEGER NOT NULL, delivery_count INTEGER NOT NULL, state INTEGER NOT NULL,
  visible_ms INTEGER NOT NULL, expires_ms INTEGER, PRIMARY KEY (queue, seq));
CREATE TABLE IF NOT EXISTS session_state (
  queue TEXT NOT NULL, session_id TEXT NOT NULL, state BLOB NOT NULL, updated_ms INTEGER NOT NULL,
  PRIMARY KEY (queue, session_id));
CREATE TABLE IF NOT EXISTS dedupe (
  queue TEXT NOT NULL, message_id TEXT NOT NULL, seen_ms INTEGER NOT NULL,
  PRIMARY KEY (queue, message_id));
";

/// Writes messages of one queue, and its next sequence number when given, inside `tx`.
fn write_batch(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    next_seq: Option<i64>,
    msgs: &[&StoredMessage],
) -> Result<(), StoreError> {
    if let Some(next_seq) = next_seq {
        tx.prepare_cached(
            "INSERT INTO queues (name, next_seq) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET next_seq = excluded.next_seq",
        )?
        .execute(params![queue, next_seq])?;
    }
    for m in msgs {
        write_row(tx, m)?;
    }
    Ok(())
}

/// The schema this binary writes (`PRAGMA user_version`). 1 had no session-state timestamps;
/// 2 no duplicate-detection history (3 adds the `dedupe` table, created on open); files from
/// before versioning read as 0 and are treated as 1.
const SCHEMA_VERSION: i64 = 3;

/// Brings a store written by an older emulator up to [`SCHEMA_VERSION`], in place, keeping
/// every message; refuses a store from a newer one.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    conn.execute_batch(SCHEMA)?;
    if found < 2 {
        let has_updated: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('session_state') WHERE name = 'updated_ms'")?
            .exists([])?;
        if !has_updated {
            conn.execute_batch(
                "ALTER TABLE session_state ADD COLUMN updated_ms INTEGER NOT NULL DEFAULT 0",
            )?;
        }
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}

impl Store {
    /// Opens `dir/emulator.sqlite3`, or an in-memory database when `dir` is `None`.
    pub fn open(dir: Option<&Path>) -> Result<Store, StoreError> {
        let mut lock = None;
        let conn = match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(StoreError::Dir)?;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(dir.join("emulator.lock"))
                    .map_err(StoreError::Dir)?;
                lock = Some(
                    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
                        .map_err(|_| StoreError::InUse(dir.to_path_buf()))?,
                );
                let conn = Connection::open(dir.join("emulator.sqlite3"))?;
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "FULL")?;
                conn
            }
            None => Connection::open_in_memory()?,
        };
        migrate(&conn)?;
        Ok(Store { conn, _lock: lock })
    }

    /// Next sequence number stored for `queue` (1 for a new queue).
    pub fn next_seq(&self, queue: &str) -> Result<i64, StoreError> {
        let n: Option<i64> = self
            .conn
            .query_row(
                "SELECT next_seq FROM queues WHERE name = ?1",
                [queue],
                |r| r.get(0),
            )
            .optional()?;
        Ok(n.unwrap_or(1))
    }

    /// Inserts messages and the queue's next sequence number in one transaction.
    pub fn insert(
        &mut self,
        queue: &str,
        next_seq: i64,
        msgs: &[&StoredMessage],
    ) -> Result<(), StoreError> {
        self.insert_batches(&[(queue, Some(next_seq), msgs.to_vec())])
    }

    /// Inserts several queues' messages in one transaction; each batch may also move its
    /// entity's next sequence number (a topic's copies are numbered by the topic).
    pub fn insert_batches(
        &mut self,
        batches: &[(&str, Option<i64>, Vec<&StoredMessage>)],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for (queue, next_seq, msgs) in batches {
            write_batch(&tx, queue, *next_seq, msgs)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores accepted messages together with the MessageIds duplicate detection must remember,
    /// in one transaction: a restart must not forget an id whose message it kept (or the resend
    /// of a reply would get through twice).
    pub fn insert_remembering(
        &mut self,
        queue: &str,
        next_seq: i64,
        msgs: &[&StoredMessage],
        seen: &[String],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        write_batch(&tx, queue, Some(next_seq), msgs)?;
        for id in seen {
            tx.prepare_cached(
                "INSERT INTO dedupe (queue, message_id, seen_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(queue, message_id) DO UPDATE SET seen_ms = excluded.seen_ms",
            )?
            .execute(params![queue, id, now_ms])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The remembered MessageIds of every queue: (queue, message id, first seen, Unix ms).
    pub fn load_dedupe(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT queue, message_id, seen_ms FROM dedupe")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets MessageIds of `queue` seen before `before_ms` (out of the window).
    pub fn prune_dedupe(&mut self, queue: &str, before_ms: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM dedupe WHERE queue = ?1 AND seen_ms < ?2")?
            .execute(params![queue, before_ms])?;
        Ok(())
    }

    /// Rewrites one message (state, count, sub-queue, sections).
    pub fn update(&mut self, m: &StoredMessage) -> Result<(), StoreError> {
        write_row(&self.conn, m)
    }

    /// Deletes one message.
    pub fn delete(&mut self, queue: &str, seq: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM messages WHERE queue = ?1 AND seq = ?2")?
            .execute(params![queue, seq])?;
        Ok(())
    }

    /// Every stored message, in sequence order.
    pub fn load(&self) -> Result<Vec<StoredMessage>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT queue, seq, dlq, data, enqueued_ms, delivery_count, state, visible_ms,
                    expires_ms FROM messages ORDER BY queue, seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, u32>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, Option<i64>>(8)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (queue, seq, dlq, data, enqueued_ms, delivery_count, state, visible_ms, exp) = row?;
            let parts = MessageParts::parse(&data).map_err(|e| StoreError::Corrupt {
                queue: queue.clone(),
                seq,
                reason: e.to_string(),
            })?;
            out.push(StoredMessage {
                queue,
                dlq,
                seq,
                parts,
                enqueued_ms,
                delivery_count,
                state: MsgState::from_i64(state),
                visible_ms,
                expires_ms: exp,
            });
        }
        Ok(out)
    }

    /// Sets (at `updated_ms`) or clears (`None`) a session's state.
    pub fn set_session_state(
        &mut self,
        queue: &str,
        session: &str,
        state: Option<&[u8]>,
        updated_ms: i64,
    ) -> Result<(), StoreError> {
        match state {
            Some(bytes) => self
                .conn
                .prepare_cached(
                    "INSERT INTO session_state (queue, session_id, state, updated_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(queue, session_id) DO UPDATE SET state = excluded.state,
                   updated_ms = excluded.updated_ms",
                )?
                .execute(params![queue, session, bytes, updated_ms])?,
            None => self
                .conn
                .prepare_cached("DELETE FROM session_state WHERE queue = ?1 AND session_id = ?2")?
                .execute(params![queue, session])?,
        };
        Ok(())
    }

    /// All stored session states as (queue, session id, state, updated at).
    pub fn load_session_states(&self) -> Result<Vec<SessionStateRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT queue, session_id, state, updated_ms FROM session_state")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

fn write_row(conn: &Connection, m: &StoredMessage) -> Result<(), StoreError> {
    let data = m.parts.encode().map_err(|e| StoreError::Corrupt {
        queue: m.queue.clone(),
        seq: m.seq,
        reason: e.to_string(),
    })?;
    conn.prepare_cached(
        "INSERT INTO messages (queue, seq, dlq, data, enqueued_ms, delivery_count, state,
                               visible_ms, expires_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT(queue, seq) DO UPDATE SET dlq = excluded.dlq, data = excluded.data,
           delivery_count = excluded.delivery_count, state = excluded.state,
           visible_ms = excluded.visible_ms, expires_ms = excluded.expires_ms",
    )?
    .execute(params![
        m.queue,
        m.seq,
        m.dlq,
        data,
        m.enqueued_ms,
        m.delivery_count,
        m.state as i64,
        m.visible_ms,
        m.expires_ms
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_data_directory_serves_one_emulator_at_a_time() {
        let dir = tempfile::tempdir().expect("tmp");
        let first = Store::open(Some(dir.path())).expect("first");
        let err = Store::open(Some(dir.path())).expect_err("second");
        assert!(matches!(err, StoreError::InUse(_)), "{err}");
        drop(first);
        Store::open(Some(dir.path())).expect("free again");
    }

    #[test]
    fn a_store_from_before_schema_versions_is_migrated_in_place() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let old = Connection::open(dir.path().join("emulator.sqlite3")).expect("open");
            old.execute_batch(
                "CREATE TABLE queues (name TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
                 CREATE TABLE session_state (queue TEXT NOT NULL, session_id TEXT NOT NULL,
                   state BLOB NOT NULL, PRIMARY KEY (queue, session_id));
                 INSERT INTO queues VALUES ('jobs', 7);
                 INSERT INTO session_state VALUES ('results', 's1', x'01');",
            )
            .expect("old schema");
        }
        let store = Store::open(Some(dir.path())).expect("migrates");
        assert_eq!(store.next_seq("jobs").expect("seq"), 7, "data kept");
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        drop(store);
        let newer = Connection::open(dir.path().join("emulator.sqlite3")).expect("open");
        newer.pragma_update(None, "user_version", 99).expect("bump");
        drop(newer);
        let err = Store::open(Some(dir.path())).expect_err("newer schema");
        assert!(
            err.to_string().contains("newer than this emulator"),
            "{err}"
        );
    }

    use super::*;

    fn msg(seq: i64) -> StoredMessage {
        StoredMessage {
            queue: "jobs".into(),
            dlq: false,
            seq,
            parts: MessageParts::default(),
            enqueued_ms: 1,
            delivery_count: 0,
            state: MsgState::Active,
            visible_ms: 1,
            expires_ms: None,
        }
    }

    #[test]
    fn survives_reopen() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(StoreError::Dir)?;
        {
            let mut s = Store::open(Some(dir.path()))?;
            s.insert("jobs", 3, &[&msg(1), &msg(2)])?;
            s.delete("jobs", 1)?;
            let mut m = msg(2);
            m.delivery_count = 4;
            s.update(&m)?;
        }
        let s = Store::open(Some(dir.path()))?;
        let rows = s.load()?;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].delivery_count, 4);
        assert_eq!(s.next_seq("jobs")?, 3);
        Ok(())
    }
}
