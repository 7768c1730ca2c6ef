//! Between AMQP messages and the engine's types: what Service Bus puts where (§4 of
//! `docs/servicebus-protocol.md`). A received message's identity, routing and user properties become
//! [`MessageProperties`]; its lock token comes from the 16-byte delivery tag in .NET GUID byte
//! order.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp_types::messaging::annotations::AnnotationKey;
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};
use uuid::Uuid;

use crate::broker::{Delivery, OutgoingMessage};
use crate::job::MessageProperties;

/// The lock a Service Bus delivery is under, from its delivery tag (`Guid.ToByteArray()`
/// order), or from the `x-opt-lock-token` delivery annotation when the tag is not a GUID.
pub fn lock_token(tag: &[u8], message: &Message<Body<Value>>) -> Option<Uuid> {
    if let Ok(bytes) = <[u8; 16]>::try_from(tag) {
        return Some(Uuid::from_bytes_le(bytes));
    }
    let annotations = message.delivery_annotations.as_ref()?;
    match annotations.get(&"x-opt-lock-token" as &dyn AnnotationKey)? {
        Value::Uuid(u) => Some(Uuid::from_bytes(*u.as_inner())),
        _ => None,
    }
}

fn message_id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Binary(b) => hex::encode(b.as_ref()),
    }
}

/// A user property as text, for the contract's string-valued properties.
fn simple_text(value: &SimpleValue) -> Option<String> {
    Some(match value {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Uuid(u) => Uuid::from_bytes(*u.as_inner()).to_string(),
        SimpleValue::Binary(b) => String::from_utf8_lossy(b.as_ref()).into_owned(),
        _ => return None,
    })
}

fn annotation<'a>(message: &'a Message<Body<Value>>, key: &str) -> Option<&'a Value> {
    message
        .message_annotations
        .as_ref()?
        .get(&key as &dyn AnnotationKey)
}

fn timestamp_of(value: Option<&Value>) -> Option<SystemTime> {
    match value? {
        Value::Timestamp(t) => {
            let ms = u64::try_from(t.milliseconds()).ok()?;
            Some(UNIX_EPOCH + Duration::from_millis(ms))
        }
        _ => None,
    }
}

/// The body as bytes: the `data` sections joined (what both SDKs send), or a string
/// `amqp-value`. Other body shapes yield `None`, which the contract reports as malformed.
pub fn body_bytes(body: &Body<Value>) -> Option<Vec<u8>> {
    match body {
        Body::Data(batch) => Some(batch.iter().flat_map(|d| d.0.iter().copied()).collect()),
        Body::Value(v) => match &v.0 {
            Value::String(s) => Some(s.as_bytes().to_vec()),
            Value::Binary(b) => Some(b.to_vec()),
            _ => None,
        },
        _ => None,
    }
}

/// A message read without a lock (peeked): what operators list and inspect.
#[derive(Debug, Clone)]
pub struct Peeked {
    pub properties: MessageProperties,
    /// The body as bytes (see [`body_bytes`]); empty for other body sections.
    pub body: Vec<u8>,
    pub enqueued_at: Option<SystemTime>,
    pub delivery_count: u32,
    /// The whole message as the broker keeps it: every section with its AMQP types.
    pub message: Message<Body<Value>>,
}

/// Decodes a whole encoded message, as management operations return it.
pub fn decode(bytes: &[u8]) -> Option<Message<Body<Value>>> {
    use fe2o3_amqp_types::messaging::message::__private::Deserializable;
    serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(bytes)
        .ok()
        .map(|d| d.0)
}

/// The readable parts of a message, and the message.
pub fn peeked(message: Message<Body<Value>>) -> Peeked {
    Peeked {
        properties: properties_of(&message),
        body: body_bytes(&message.body).unwrap_or_default(),
        enqueued_at: timestamp_of(annotation(&message, "x-opt-enqueued-time")),
        delivery_count: message
            .header
            .as_ref()
            .map(|h| h.delivery_count)
            .unwrap_or(0),
        message,
    }
}

fn properties_of(message: &Message<Body<Value>>) -> MessageProperties {
    let props = message.properties.as_ref();
    let mut out = MessageProperties {
        message_id: props
            .and_then(|p| p.message_id.as_ref())
            .map(message_id_text),
        correlation_id: props
            .and_then(|p| p.correlation_id.as_ref())
            .map(message_id_text),
        reply_to: props.and_then(|p| p.reply_to.clone()),
        reply_to_session_id: props.and_then(|p| p.reply_to_group_id.clone()),
        content_type: props
            .and_then(|p| p.content_type.as_ref())
            .map(|s| s.0.clone()),
        ..Default::default()
    };
    if let Some(app) = &message.application_properties {
        for (k, v) in app.0.iter() {
            if let Some(text) = simple_text(v) {
                out.application.insert(k.clone(), text);
            }
        }
    }
    out.sequence_number = match annotation(message, "x-opt-sequence-number") {
        Some(Value::Long(n)) => Some(*n),
        _ => None,
    };
    out
}

/// Turns a received message into a [`Delivery`].
pub fn to_delivery(
    tag: &[u8],
    message: &Message<Body<Value>>,
    default_lock: Duration,
) -> Option<Delivery> {
    let lock_token = lock_token(tag, message)?;
    let out = properties_of(message);
    let now = SystemTime::now();
    let lock_left = timestamp_of(annotation(message, "x-opt-locked-until"))
        .map(|until| until.duration_since(now).unwrap_or_default())
        .unwrap_or(default_lock);
    Some(Delivery {
        lock_token,
        // A body the contract cannot read becomes an empty one, answered as MalformedJob.
        body: body_bytes(&message.body).unwrap_or_default(),
        properties: out,
        delivery_count: message
            .header
            .as_ref()
            .map(|h| h.delivery_count)
            .unwrap_or(0),
        locked_until: tokio::time::Instant::now() + lock_left,
        enqueued_at: timestamp_of(annotation(message, "x-opt-enqueued-time")),
    })
}

/// Encodes a message to send; `enqueue_at` schedules it (`x-opt-scheduled-enqueue-time`).
pub fn to_amqp(message: &OutgoingMessage, enqueue_at: Option<SystemTime>) -> Message<Body<Value>> {
    let properties = Properties {
        message_id: message.message_id.clone().map(MessageId::String),
        correlation_id: message.correlation_id.clone().map(MessageId::String),
        group_id: message.session_id.clone(),
        reply_to: message.reply_to.clone(),
        reply_to_group_id: message.reply_to_session_id.clone(),
        content_type: message.content_type.clone().map(Symbol::from),
        ..Default::default()
    };
    let mut application = ApplicationProperties::default();
    for (k, v) in &message.application {
        application
            .0
            .insert(k.clone(), SimpleValue::String(v.clone()));
    }
    let annotations = enqueue_at.map(|at| {
        let ms = at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        MessageAnnotations::builder()
            .insert(
                Symbol::from("x-opt-scheduled-enqueue-time"),
                Value::Timestamp(Timestamp::from_milliseconds(
                    i64::try_from(ms).unwrap_or(i64::MAX),
                )),
            )
            .build()
    });
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: annotations,
        properties: Some(properties),
        application_properties: Some(application),
        body: Body::Data(vec![Data(Binary::from(message.body.clone()))].into()),
        footer: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_the_round_trip() {
        let mut out = OutgoingMessage {
            message_id: Some("m1".into()),
            correlation_id: Some("c1".into()),
            reply_to: Some("results".into()),
            reply_to_session_id: Some("s1".into()),
            content_type: Some("application/json".into()),
            body: br#"{"worker":"w"}"#.to_vec(),
            ..Default::default()
        };
        out.application.insert("attempt".into(), "2".into());
        let amqp = to_amqp(&out, None);
        let token = Uuid::new_v4();
        let delivery =
            to_delivery(&token.to_bytes_le(), &amqp, Duration::from_secs(30)).expect("delivery");
        assert_eq!(
            delivery.lock_token, token,
            "the tag is read in .NET GUID byte order"
        );
        assert_eq!(delivery.body, out.body);
        let p = &delivery.properties;
        assert_eq!(p.message_id.as_deref(), Some("m1"));
        assert_eq!(p.correlation_id.as_deref(), Some("c1"));
        assert_eq!(p.reply_to.as_deref(), Some("results"));
        assert_eq!(p.reply_to_session_id.as_deref(), Some("s1"));
        assert_eq!(p.application["attempt"], "2");
    }

    #[test]
    fn lock_tokens_follow_the_dotnet_byte_order() {
        // .NET Guid.ToByteArray() of 00112233-4455-6677-8899-aabbccddeeff
        let tag = [
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        let msg = to_amqp(&OutgoingMessage::default(), None);
        let token = lock_token(&tag, &msg).expect("token");
        assert_eq!(token.to_string(), "00112233-4455-6677-8899-aabbccddeeff");
    }
}
