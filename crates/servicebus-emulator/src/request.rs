//! The request/response envelope shared by `$cbs` and `$management` (§2, §6.1).

use fe2o3_amqp_types::messaging::{AmqpValue, ApplicationProperties, Properties};
use fe2o3_amqp_types::primitives::{OrderedMap, SimpleValue, Symbol, Value};
use uuid::Uuid;

use super::codec::{CodecError, decode, encode};
use super::error::SbError;
use super::message::MessageParts;

/// A decoded request message.
#[derive(Debug, Clone)]
pub struct Request {
    /// The whole message (its properties give message-id and reply-to).
    pub parts: MessageParts,
    /// The `operation` application property.
    pub operation: String,
    /// The amqp-value body (`Null` when absent).
    pub body: Value,
}

impl Request {
    /// Decodes a request from message bytes.
    pub fn parse(bytes: &[u8]) -> Result<Request, SbError> {
        let parts = MessageParts::parse(bytes).map_err(|e| SbError::Argument(e.to_string()))?;
        let operation = match app_prop(&parts, "operation") {
            Some(SimpleValue::String(s)) => s.clone(),
            Some(SimpleValue::Symbol(s)) => s.as_str().to_string(),
            _ => return Err(SbError::Argument("the request has no operation".into())),
        };
        let body = if parts.body.is_empty() {
            Value::Null
        } else {
            decode::<AmqpValue<Value>>("request body", &parts.body)
                .map_err(|e| SbError::Argument(e.to_string()))?
                .0
        };
        Ok(Request {
            parts,
            operation,
            body,
        })
    }

    /// The application property `key`.
    pub fn app_prop(&self, key: &str) -> Option<&SimpleValue> {
        app_prop(&self.parts, key)
    }

    /// The `reply-to` address, if any.
    pub fn reply_to(&self) -> Option<&str> {
        self.parts.properties.as_ref()?.reply_to.as_deref()
    }

    /// The body map entry `key` (keys are `str` in requests, `sym` tolerated).
    pub fn field(&self, key: &str) -> Option<&Value> {
        let Value::Map(map) = &self.body else {
            return None;
        };
        map.get(&Value::String(key.to_string()))
            .or_else(|| map.get(&Value::Symbol(Symbol::from(key))))
            .filter(|v| !matches!(v, Value::Null))
    }
}

fn app_prop<'a>(parts: &'a MessageParts, key: &str) -> Option<&'a SimpleValue> {
    parts.app_props.as_ref()?.0.get(key)
}

/// Which spelling of the status properties the node uses (§6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// `status-code` / `status-description`.
    Cbs,
    /// `statusCode` / `statusDescription` / `errorCondition`.
    Management,
}

/// Builds a response: correlation-id keeps the request message-id's AMQP type (§0.4).
pub fn response(
    req: &MessageParts,
    node: Node,
    status: i32,
    description: &str,
    condition: Option<&str>,
    body: Option<Value>,
) -> Result<Vec<u8>, CodecError> {
    let (code_key, desc_key) = match node {
        Node::Cbs => ("status-code", "status-description"),
        Node::Management => ("statusCode", "statusDescription"),
    };
    let mut props = OrderedMap::new();
    props.insert(code_key.to_string(), SimpleValue::Int(status));
    props.insert(
        desc_key.to_string(),
        SimpleValue::String(description.to_string()),
    );
    if let Some(c) = condition {
        props.insert(
            "errorCondition".to_string(),
            SimpleValue::Symbol(Symbol::from(c)),
        );
    }
    let request_props = req.properties.as_ref();
    let parts = MessageParts {
        properties: Some(Properties {
            correlation_id: request_props.and_then(|p| p.message_id.clone()),
            to: request_props.and_then(|p| p.reply_to.clone()),
            ..Default::default()
        }),
        app_props: Some(ApplicationProperties(props)),
        body: encode("response body", &AmqpValue(body.unwrap_or(Value::Null)))?,
        ..Default::default()
    };
    parts.encode()
}

/// Reads an integer of any AMQP width.
pub fn as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::Byte(n) => i64::from(*n),
        Value::Short(n) => i64::from(*n),
        Value::Int(n) => i64::from(*n),
        Value::Long(n) => *n,
        Value::Ubyte(n) => i64::from(*n),
        Value::Ushort(n) => i64::from(*n),
        Value::Uint(n) => i64::from(*n),
        Value::Ulong(n) => i64::try_from(*n).ok()?,
        Value::Timestamp(t) => t.milliseconds(),
        _ => return None,
    })
}

/// Reads a string or symbol.
pub fn as_str(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Symbol(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Reads an array or list as a vector of values.
pub fn as_list(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) => Some(&a.0),
        Value::List(l) => Some(l),
        _ => None,
    }
}

/// Reads an AMQP uuid (RFC 4122 byte order, §4.4).
pub fn as_uuid(v: &Value) -> Option<Uuid> {
    match v {
        Value::Uuid(u) => Some(Uuid::from_bytes(u.clone().into_inner())),
        Value::String(s) => Uuid::parse_str(s).ok(),
        _ => None,
    }
}

/// Builds a map body with `str` keys.
pub fn map_body(entries: Vec<(&str, Value)>) -> Value {
    let mut map = OrderedMap::new();
    for (k, v) in entries {
        map.insert(Value::String(k.to_string()), v);
    }
    Value::Map(map)
}
