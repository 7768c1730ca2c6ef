//! The `<entity>/$management` node (§6): lock renewal, peek, scheduling, deferral and
//! sessions. Each operation maps a request body to a broker call and back.

use fe2o3_amqp_types::primitives::{Array, Binary, SimpleValue, Timestamp, Value};
use uuid::Uuid;

use super::error::SbError;
use super::message::MessageParts;
use super::queue::{EntityRef, LinkId, Namespace, Settlement};
use super::request::{Request, as_i64, as_list, as_str, as_uuid, map_body};

/// Most message bytes one peek response carries: it must fit the 1 MiB the response link
/// advertises, with room for the envelope. Service Bus too returns fewer messages than asked
/// for; clients go on from the last sequence number they got.
const PEEK_BUDGET: usize = (1 << 20) - 64 * 1024;

/// A management reply: status, description, condition (on failure) and body.
#[derive(Debug)]
pub struct Reply {
    /// 200, 204 or an error status.
    pub status: i32,
    /// Human-readable status.
    pub description: String,
    /// Error condition symbol, on failure.
    pub condition: Option<&'static str>,
    /// amqp-value body.
    pub body: Option<Value>,
}

impl Reply {
    fn ok(body: Option<Value>) -> Reply {
        Reply {
            status: 200,
            description: "OK".into(),
            condition: None,
            body,
        }
    }
    fn no_content() -> Reply {
        Reply {
            status: 204,
            description: "No Content".into(),
            condition: None,
            body: None,
        }
    }
}

/// Runs one management operation against `entity`.
pub fn handle(broker: &Namespace, entity: &EntityRef, owner: LinkId, req: &Request) -> Reply {
    match dispatch(broker, entity, owner, req) {
        Ok(r) => r,
        Err(e) => Reply {
            status: e.status(),
            description: e.to_string(),
            condition: Some(e.condition()),
            body: None,
        },
    }
}

fn dispatch(
    broker: &Namespace,
    e: &EntityRef,
    owner: LinkId,
    req: &Request,
) -> Result<Reply, SbError> {
    let op = req
        .operation
        .strip_prefix("com.microsoft:")
        .unwrap_or(&req.operation);
    match op {
        "renew-lock" => {
            let tokens = uuids(req, "lock-tokens")?;
            let exp = broker.renew_locks(&tokens)?;
            Ok(Reply::ok(Some(map_body(vec![(
                "expirations",
                Value::Array(Array(exp.into_iter().map(ts).collect())),
            )]))))
        }
        "peek-message" => {
            let from = int(req, "from-sequence-number")?;
            let count = int(req, "message-count")?.clamp(0, 1000) as usize;
            let session = opt_str(req, "session-id");
            let msgs = broker.peek_within(e, from, count, session.as_deref(), PEEK_BUDGET)?;
            if msgs.is_empty() {
                return Ok(Reply::no_content());
            }
            Ok(Reply::ok(Some(messages_body(
                msgs.into_iter().map(|b| (None, b)).collect(),
            ))))
        }
        "schedule-message" => schedule(broker, e, req),
        "cancel-scheduled-message" => {
            broker.cancel_scheduled(e, &ints(req, "sequence-numbers")?)?;
            Ok(Reply::ok(None))
        }
        "receive-by-sequence-number" => {
            let seqs = ints(req, "sequence-numbers")?;
            let lock = req.field("receiver-settle-mode").and_then(as_i64) != Some(0);
            let got = broker.receive_deferred(e, &seqs, lock, owner)?;
            Ok(Reply::ok(Some(messages_body(
                got.into_iter().map(|d| (d.token, d.bytes)).collect(),
            ))))
        }
        "update-disposition" => update_disposition(broker, req),
        "renew-session-lock" => {
            let sid = opt_str(req, "session-id").ok_or_else(|| missing("session-id"))?;
            let until = broker.renew_session_lock(e, &sid)?;
            Ok(Reply::ok(Some(map_body(vec![("expiration", ts(until))]))))
        }
        "get-session-state" => {
            let sid = opt_str(req, "session-id").ok_or_else(|| missing("session-id"))?;
            let state = broker.session_state(e, &sid)?;
            let value = state.map_or(Value::Null, |b| Value::Binary(Binary::from(b)));
            Ok(Reply::ok(Some(map_body(vec![("session-state", value)]))))
        }
        "set-session-state" => {
            let sid = opt_str(req, "session-id").ok_or_else(|| missing("session-id"))?;
            let value = match req.field("session-state") {
                Some(Value::Binary(b)) => Some(b.to_vec()),
                Some(Value::String(s)) => Some(s.as_bytes().to_vec()),
                _ => None,
            };
            broker.set_session_state(e, &sid, value)?;
            Ok(Reply::ok(None))
        }
        "get-message-sessions" => message_sessions(broker, e, req),
        other => Err(SbError::NotAllowed(format!(
            "operation {other} is not supported by this emulator"
        ))),
    }
}

/// `schedule-message`: enqueues each message (visible at its ScheduledEnqueueTimeUtc) and
/// answers their sequence numbers.
fn schedule(broker: &Namespace, e: &EntityRef, req: &Request) -> Result<Reply, SbError> {
    let list = req
        .field("messages")
        .and_then(as_list)
        .ok_or_else(|| missing("messages"))?;
    let mut parts = Vec::new();
    for item in list {
        let bytes = map_entry(item, "message")
            .and_then(|v| match v {
                Value::Binary(b) => Some(b.to_vec()),
                _ => None,
            })
            .ok_or_else(|| missing("message"))?;
        parts.push(MessageParts::parse(&bytes).map_err(|e| SbError::Argument(e.to_string()))?);
    }
    let seqs = broker.enqueue(e, parts)?;
    Ok(Reply::ok(Some(map_body(vec![(
        "sequence-numbers",
        Value::Array(Array(seqs.into_iter().map(Value::Long).collect())),
    )]))))
}

/// `update-disposition`: settles messages by lock token (the SDKs' path for deferred messages
/// and after a reconnect).
fn update_disposition(broker: &Namespace, req: &Request) -> Result<Reply, SbError> {
    let status = opt_str(req, "disposition-status").ok_or_else(|| missing("status"))?;
    let props = props_to_modify(req);
    let outcome = match status.as_str() {
        "completed" => Settlement::Complete,
        "abandoned" => Settlement::Abandon(props),
        "defered" | "deferred" => Settlement::Defer(props),
        "suspended" => Settlement::DeadLetter {
            reason: opt_str(req, "deadletter-reason"),
            description: opt_str(req, "deadletter-description"),
            props,
        },
        other => {
            return Err(SbError::Argument(format!(
                "unknown disposition-status {other}"
            )));
        }
    };
    for token in uuids(req, "lock-tokens")? {
        broker.settle(token, outcome.clone())?;
    }
    Ok(Reply::ok(None))
}

/// `get-message-sessions`: the ids of sessions with messages (or state), paged by skip/top.
fn message_sessions(broker: &Namespace, e: &EntityRef, req: &Request) -> Result<Reply, SbError> {
    let skip = req.field("skip").and_then(as_i64).unwrap_or(0).max(0) as usize;
    let top = req.field("top").and_then(as_i64).unwrap_or(100).max(0) as usize;
    // DateTime.MaxValue (year 10000) means "no filter" (Python and .NET send it).
    let after = req
        .field("last-updated-time")
        .and_then(as_i64)
        .filter(|ms| *ms < DATETIME_MAX_MS);
    let ids: Vec<Value> = broker
        .list_sessions(e, after)?
        .into_iter()
        .skip(skip)
        .take(top)
        .map(Value::String)
        .collect();
    if ids.is_empty() {
        return Ok(Reply::no_content());
    }
    Ok(Reply::ok(Some(map_body(vec![
        (
            "skip",
            Value::Int(i32::try_from(skip + ids.len()).unwrap_or(i32::MAX)),
        ),
        ("sessions-ids", Value::Array(Array(ids))),
    ]))))
}

/// .NET `DateTime.MaxValue` in Unix milliseconds, rounded down to the second.
const DATETIME_MAX_MS: i64 = 253_402_300_799_000;

fn missing(key: &str) -> SbError {
    SbError::Argument(format!("the request has no valid {key}"))
}

fn ts(ms: i64) -> Value {
    Value::Timestamp(Timestamp::from_milliseconds(ms))
}

fn int(req: &Request, key: &str) -> Result<i64, SbError> {
    req.field(key).and_then(as_i64).ok_or_else(|| missing(key))
}

fn ints(req: &Request, key: &str) -> Result<Vec<i64>, SbError> {
    let list = req
        .field(key)
        .and_then(as_list)
        .ok_or_else(|| missing(key))?;
    list.iter()
        .map(|v| as_i64(v).ok_or_else(|| missing(key)))
        .collect()
}

fn uuids(req: &Request, key: &str) -> Result<Vec<Uuid>, SbError> {
    let list = req
        .field(key)
        .and_then(as_list)
        .ok_or_else(|| missing(key))?;
    list.iter()
        .map(|v| as_uuid(v).ok_or_else(|| missing(key)))
        .collect()
}

fn opt_str(req: &Request, key: &str) -> Option<String> {
    req.field(key).and_then(as_str).map(str::to_string)
}

fn map_entry<'a>(item: &'a Value, key: &str) -> Option<&'a Value> {
    match item {
        Value::Map(m) => m
            .get(&Value::String(key.to_string()))
            .or_else(|| m.get(&Value::Symbol(key.into()))),
        _ => None,
    }
}

fn props_to_modify(req: &Request) -> Vec<(String, SimpleValue)> {
    let Some(Value::Map(map)) = req.field("properties-to-modify") else {
        return Vec::new();
    };
    map.iter()
        .filter_map(|(k, v)| {
            let key = as_str(k)?.to_string();
            let value = SimpleValue::try_from(v.clone()).ok()?;
            Some((key, value))
        })
        .collect()
}

fn messages_body(msgs: Vec<(Option<Uuid>, Vec<u8>)>) -> Value {
    let list = msgs
        .into_iter()
        .map(|(token, bytes)| {
            let mut entries = vec![("message", Value::Binary(Binary::from(bytes)))];
            if let Some(t) = token {
                entries.push((
                    "lock-token",
                    Value::Uuid(fe2o3_amqp_types::primitives::Uuid::from(t.into_bytes())),
                ));
            }
            map_body(entries)
        })
        .collect();
    map_body(vec![("messages", Value::List(list))])
}
