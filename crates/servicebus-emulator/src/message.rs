//! A message as the broker keeps it: the sections it reads or rewrites are decoded, the
//! body and footer stay as the client's bytes so body types survive unchanged (§4.3).

use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Data, DeliveryAnnotations, Header, MessageAnnotations, MessageId,
    Properties, annotations::OwnedKey,
};
use fe2o3_amqp_types::primitives::{SimpleValue, Symbol, Timestamp, Value};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;

use super::codec::{CodecError, decode, descriptor_code, encode, encoded_len};

/// Message format of a Service Bus batch: each `data` section is a whole encoded message.
pub const BATCH_FORMAT: u32 = 0x8001_3700;

/// The sections of one message. Incoming delivery annotations are dropped on purpose: they
/// belong to one hop, and the broker writes its own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageParts {
    /// TTL in, delivery count out.
    pub header: Option<Header>,
    /// Broker-written, per delivery (`x-opt-lock-token`); never stored.
    pub delivery_annotations: Option<DeliveryAnnotations>,
    /// Client annotations plus the broker's `x-opt-*` ones.
    pub annotations: Option<MessageAnnotations>,
    /// Message id (dedupe), group id (session id), and the rest passed through.
    pub properties: Option<Properties>,
    /// User properties; dead-letter reasons are merged in here.
    pub app_props: Option<ApplicationProperties>,
    /// Body sections, byte for byte as received.
    pub body: Vec<u8>,
    /// Footer section bytes, if any.
    pub footer: Vec<u8>,
}

impl MessageParts {
    /// Splits an encoded message into its sections.
    pub fn parse(mut buf: &[u8]) -> Result<Self, CodecError> {
        let mut parts = MessageParts::default();
        while !buf.is_empty() {
            let len = encoded_len(buf)?;
            let (section, rest) = buf.split_at(len);
            match descriptor_code(section) {
                Some(0x70) => parts.header = Some(decode("header", section)?),
                Some(0x71) => {}
                Some(0x72) => parts.annotations = Some(decode("message-annotations", section)?),
                Some(0x73) => parts.properties = Some(decode("properties", section)?),
                Some(0x74) => parts.app_props = Some(decode("application-properties", section)?),
                Some(0x75..=0x77) => parts.body.extend_from_slice(section),
                Some(0x78) => parts.footer.extend_from_slice(section),
                _ => {
                    return Err(CodecError::Decode {
                        what: "message",
                        reason: "a message section has an unknown descriptor".into(),
                    });
                }
            }
            buf = rest;
        }
        Ok(parts)
    }

    /// Encodes the sections in the order AMQP requires.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(self.body.len() + 256);
        if let Some(h) = &self.header {
            out.extend(encode_header(h)?);
        }
        if let Some(a) = &self.delivery_annotations {
            out.extend(encode("delivery-annotations", a)?);
        }
        if let Some(a) = &self.annotations {
            out.extend(encode("message-annotations", a)?);
        }
        if let Some(p) = &self.properties {
            out.extend(encode("properties", p)?);
        }
        if let Some(a) = &self.app_props {
            out.extend(encode("application-properties", a)?);
        }
        out.extend_from_slice(&self.body);
        out.extend_from_slice(&self.footer);
        Ok(out)
    }

    /// Unpacks a batch (format `0x80013700`): every `data` section holds one message.
    pub fn unpack_batch(&self) -> Result<Vec<MessageParts>, CodecError> {
        let mut buf = self.body.as_slice();
        let mut out = Vec::new();
        while !buf.is_empty() {
            let len = encoded_len(buf)?;
            let (section, rest) = buf.split_at(len);
            if descriptor_code(section) == Some(0x75) {
                let data: Data = decode("batch data section", section)?;
                out.push(MessageParts::parse(&data.0)?);
            }
            buf = rest;
        }
        Ok(out)
    }

    /// The annotation `key`, if present.
    pub fn annotation(&self, key: &str) -> Option<&Value> {
        self.annotations
            .as_ref()?
            .0
            .get(&OwnedKey::Symbol(Symbol::from(key)))
    }

    /// Sets annotation `key`, creating the section when needed.
    pub fn set_annotation(&mut self, key: &str, value: Value) {
        self.annotations
            .get_or_insert_with(|| MessageAnnotations(Default::default()))
            .0
            .insert(OwnedKey::Symbol(Symbol::from(key)), value);
    }

    /// Puts the lock token in the `x-opt-lock-token` delivery annotation.
    pub fn set_lock_token(&mut self, token: uuid::Uuid) {
        self.delivery_annotations
            .get_or_insert_with(|| DeliveryAnnotations(Default::default()))
            .0
            .insert(
                OwnedKey::Symbol(Symbol::from("x-opt-lock-token")),
                Value::Uuid(fe2o3_amqp_types::primitives::Uuid::from(token.into_bytes())),
            );
    }

    /// Sets a user property, creating the section when needed.
    pub fn set_app_prop(&mut self, key: &str, value: SimpleValue) {
        self.app_props
            .get_or_insert_with(|| ApplicationProperties(Default::default()))
            .0
            .insert(key.to_string(), value);
    }

    /// The session id (`group-id`).
    pub fn session_id(&self) -> Option<&str> {
        self.properties.as_ref()?.group_id.as_deref()
    }

    /// The message id as text, for duplicate detection.
    pub fn message_id_text(&self) -> Option<String> {
        let id = self.properties.as_ref()?.message_id.as_ref()?;
        Some(match id {
            MessageId::String(s) => format!("s:{s}"),
            MessageId::Ulong(n) => format!("n:{n}"),
            MessageId::Uuid(u) => format!("u:{}", hex::encode(u.as_inner())),
            MessageId::Binary(b) => format!("b:{}", hex::encode(b.as_slice())),
        })
    }

    /// Gives a message without a message-id a new one, as Service Bus does: JS sends none,
    /// and its receiver needs one to track the message's lock.
    pub fn ensure_message_id(&mut self) {
        let props = self.properties.get_or_insert_with(Properties::default);
        if props.message_id.is_none() {
            props.message_id = Some(MessageId::String(uuid::Uuid::new_v4().simple().to_string()));
        }
    }

    /// Header TTL in milliseconds, if any.
    pub fn ttl_ms(&self) -> Option<u32> {
        self.header.as_ref()?.ttl
    }

    /// `x-opt-scheduled-enqueue-time` in Unix milliseconds, if set.
    pub fn scheduled_enqueue_ms(&self) -> Option<i64> {
        match self.annotation("x-opt-scheduled-enqueue-time")? {
            Value::Timestamp(t) => Some(t.milliseconds()),
            Value::Long(n) => Some(*n),
            _ => None,
        }
    }

    /// Sets the header delivery count, creating the header when needed.
    pub fn set_delivery_count(&mut self, count: u32) {
        self.header
            .get_or_insert_with(Header::default)
            .delivery_count = count;
    }

    /// Sets `absolute-expiry-time`, which the broker owns on output (§4.1).
    pub fn set_absolute_expiry(&mut self, ms: Option<i64>) {
        if let Some(ms) = ms {
            self.properties
                .get_or_insert_with(Properties::default)
                .absolute_expiry_time = Some(Timestamp::from_milliseconds(ms));
        }
    }
}

/// Encodes a header with every field present. The derived encoder drops trailing defaults,
/// so a first delivery would carry no `delivery-count` and Python would show `None`.
fn encode_header(h: &Header) -> Result<Vec<u8>, CodecError> {
    let fields = vec![
        Value::Bool(h.durable),
        Value::Ubyte(h.priority.0),
        h.ttl.map_or(Value::Null, Value::Uint),
        Value::Bool(h.first_acquirer),
        Value::Uint(h.delivery_count),
    ];
    let described = Described {
        descriptor: Descriptor::Code(0x70),
        value: Value::List(fields),
    };
    encode("header", &Value::Described(Box::new(described)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::primitives::Binary;

    fn sample() -> MessageParts {
        let mut m = MessageParts {
            properties: Some(Properties {
                message_id: Some(MessageId::String("m1".into())),
                group_id: Some("s1".into()),
                ..Default::default()
            }),
            body: encode("data", &Data(Binary::from(b"hello".to_vec()))).unwrap_or_default(),
            ..Default::default()
        };
        m.set_annotation("x-opt-sequence-number", Value::Long(3));
        m.set_app_prop("k", SimpleValue::String("v".into()));
        m
    }

    #[test]
    fn round_trip_keeps_sections() -> Result<(), CodecError> {
        let m = sample();
        let again = MessageParts::parse(&m.encode()?)?;
        assert_eq!(again, m);
        assert_eq!(again.session_id(), Some("s1"));
        assert_eq!(again.message_id_text().as_deref(), Some("s:m1"));
        Ok(())
    }

    #[test]
    fn batch_unpacks_each_message() -> Result<(), CodecError> {
        let inner = sample().encode()?;
        let mut body = encode("data", &Data(Binary::from(inner.clone())))?;
        body.extend(encode("data", &Data(Binary::from(inner)))?);
        let batch = MessageParts {
            body,
            ..Default::default()
        };
        assert_eq!(batch.unpack_batch()?.len(), 2);
        Ok(())
    }
}
