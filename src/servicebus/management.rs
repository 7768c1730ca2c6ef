//! Requests to an entity's `$management` node (§6 of `docs/servicebus-protocol.md`):
//! renew-lock and update-disposition for the engine, peek for operators.
//!
//! `fe2o3-amqp-management` carries the request/response exchange; the request type here sets
//! the operation per call, and the response keeps status, condition and body so that each
//! caller decides what a status means (410 and `message-lock-lost` mean the lock is gone).

use fe2o3_amqp_management::error::Error as MgmtError;
use fe2o3_amqp_management::request::Request;
use fe2o3_amqp_management::response::Response;
use fe2o3_amqp_types::messaging::{ApplicationProperties, Message};
use fe2o3_amqp_types::primitives::{OrderedMap, SimpleValue, Value};

/// One management request; the operation is set per call (`com.microsoft:…`).
#[derive(Debug, Clone)]
pub struct MgmtRequest {
    pub operation: &'static str,
    pub body: OrderedMap<String, Value>,
    /// The data link the request concerns, so the service can route it to the same partition.
    pub associated_link: Option<String>,
}

impl MgmtRequest {
    pub fn new(operation: &'static str) -> Self {
        Self {
            operation,
            body: OrderedMap::new(),
            associated_link: None,
        }
    }

    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.body.insert(key.to_owned(), value);
        self
    }
}

impl Request for MgmtRequest {
    // The real operation goes into the application properties below; the library only fills
    // `operation` from this constant when none is set.
    const OPERATION: &'static str = "";
    type Response = MgmtResponse;
    type Body = OrderedMap<String, Value>;

    fn encode_application_properties(&mut self) -> Option<ApplicationProperties> {
        let mut props = ApplicationProperties::builder()
            .insert("operation", SimpleValue::String(self.operation.to_owned()))
            .insert("com.microsoft:server-timeout", SimpleValue::Uint(30_000));
        if let Some(link) = &self.associated_link {
            props = props.insert("associated-link-name", SimpleValue::String(link.clone()));
        }
        Some(props.build())
    }

    fn encode_body(self) -> Self::Body {
        self.body
    }
}

/// A management response: its status, the error condition if any, and the body.
#[derive(Debug, Clone)]
pub struct MgmtResponse {
    pub status: u16,
    pub condition: Option<String>,
    pub description: Option<String>,
    pub body: Value,
}

fn app_text(props: &ApplicationProperties, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| match props.0.get(*k)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    })
}

fn app_status(props: &ApplicationProperties) -> Option<u16> {
    ["statusCode", "status-code"].iter().find_map(|k| {
        let n: i64 = match props.0.get(*k)? {
            SimpleValue::Int(n) => i64::from(*n),
            SimpleValue::Uint(n) => i64::from(*n),
            SimpleValue::Long(n) => *n,
            SimpleValue::Ulong(n) => i64::try_from(*n).ok()?,
            SimpleValue::Short(n) => i64::from(*n),
            SimpleValue::Ushort(n) => i64::from(*n),
            _ => return None,
        };
        u16::try_from(n).ok()
    })
}

impl Response for MgmtResponse {
    const STATUS_CODE: u16 = 200;
    type Body = Option<Value>;
    type Error = MgmtError;

    fn decode_message(message: Message<Self::Body>) -> Result<Self, Self::Error> {
        Self::from_message(message)
    }

    /// Never fails on a status: the caller maps statuses to outcomes.
    fn from_message(message: Message<Self::Body>) -> Result<Self, Self::Error> {
        let props = message.application_properties.clone().unwrap_or_default();
        Ok(MgmtResponse {
            status: app_status(&props).ok_or(MgmtError::StatusCodeNotFound)?,
            condition: app_text(&props, &["errorCondition", "error-condition"]),
            description: app_text(&props, &["statusDescription", "status-description"]),
            body: message.body.unwrap_or(Value::Null),
        })
    }
}

impl MgmtResponse {
    /// The value under `key` in a map body.
    pub fn field(&self, key: &str) -> Option<&Value> {
        match &self.body {
            Value::Map(map) => map.iter().find_map(|(k, v)| match k {
                Value::String(s) | Value::Symbol(serde_amqp::primitives::Symbol(s)) if s == key => {
                    Some(v)
                }
                _ => None,
            }),
            _ => None,
        }
    }

    /// True when the response says the lock (or the message it names) is gone.
    pub fn is_lock_lost(&self) -> bool {
        self.status == 410
            || self.condition.as_deref().is_some_and(|c| {
                c.ends_with("message-lock-lost")
                    || c.ends_with("session-lock-lost")
                    || c.ends_with("message-not-found")
            })
    }
}
