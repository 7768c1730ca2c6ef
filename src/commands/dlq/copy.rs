//! The copy `dlq replay` sends: the dead letter's own AMQP message, section for section, so
//! that every body type (data, value, sequence) and every property keeps its AMQP type. Only
//! what the broker stamped on the dead letter is taken off (sequence number, enqueue time,
//! lock, dead-letter reason), the copy gets a MessageId of its own, and `--edit-input` may
//! replace the `input` of a JSON body.

use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{Body, Data, Header, Message, MessageId};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Value};
use serde_json::Value as Json;

use crate::job::{ATTEMPT_PROPERTY, JOB_ID_PROPERTY};
use crate::servicebus::message::body_bytes;

/// Application properties Service Bus puts on a dead letter.
pub const REASON: &str = "DeadLetterReason";
pub const DESCRIPTION: &str = "DeadLetterErrorDescription";

/// Message annotations the broker sets on what it delivers; a copy must not carry them.
const BROKER_ANNOTATIONS: [&str; 9] = [
    "x-opt-sequence-number",
    "x-opt-enqueued-time",
    "x-opt-locked-until",
    "x-opt-enqueue-sequence-number",
    "x-opt-deadletter-source",
    "x-opt-message-state",
    "x-opt-partition-id",
    "x-opt-lock-token",
    "x-opt-scheduled-enqueue-time",
];

/// Why a dead letter cannot be replayed; it stays where it is.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("it has no body, and an empty job can only fail again")]
    EmptyBody,
    #[error("--edit-input needs a JSON object body, and this body is {0}")]
    NotJson(&'static str),
}

/// The copy of dead letter `sequence` (job `job_id`), with `input` replaced when `edited`.
pub fn replay_copy(
    original: &Message<Body<Value>>,
    job_id: &str,
    sequence: i64,
    edited: Option<&Json>,
) -> Result<Message<Body<Value>>, CopyError> {
    let body = match edited {
        None => original.body.clone(),
        Some(input) => {
            Body::Data(vec![Data(Binary::from(with_input(&original.body, input)?))].into())
        }
    };
    if is_empty(&body) {
        return Err(CopyError::EmptyBody);
    }
    let header = original.header.as_ref().map(|h| Header {
        delivery_count: 0,
        first_acquirer: false,
        ..h.clone()
    });
    let message_annotations = original.message_annotations.clone().and_then(|mut a| {
        for key in BROKER_ANNOTATIONS {
            a.0.swap_remove(&OwnedKey::from(key));
        }
        (!a.0.is_empty()).then_some(a)
    });
    let mut properties = original.properties.clone().unwrap_or_default();
    properties.message_id = Some(MessageId::String(format!("{job_id}:replay-{sequence}")));
    // The broker sets it from the time to live on every delivery.
    properties.absolute_expiry_time = None;
    let mut application = original.application_properties.clone().unwrap_or_default();
    for key in [REASON, DESCRIPTION, ATTEMPT_PROPERTY] {
        application.0.swap_remove(key);
    }
    application.0.insert(
        JOB_ID_PROPERTY.to_owned(),
        SimpleValue::String(job_id.to_owned()),
    );
    Ok(Message {
        header,
        delivery_annotations: None,
        message_annotations,
        properties: Some(properties),
        application_properties: Some(application),
        body,
        footer: original.footer.clone(),
    })
}

fn is_empty(body: &Body<Value>) -> bool {
    match body {
        Body::Empty => true,
        Body::Data(sections) => sections.iter().all(|d| d.0.is_empty()),
        Body::Sequence(sections) => sections.iter().all(|s| s.0.is_empty()),
        Body::Value(_) => false,
    }
}

/// A JSON object body with its `input` replaced, as bytes for one data section.
fn with_input(body: &Body<Value>, input: &Json) -> Result<Vec<u8>, CopyError> {
    let kind = match body {
        Body::Data(_) => "not a JSON object",
        Body::Value(_) => "an AMQP value",
        Body::Sequence(_) => "an AMQP sequence",
        Body::Empty => "empty",
    };
    let mut doc: Json = body_bytes(body)
        .filter(|_| matches!(body, Body::Data(_)))
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(CopyError::NotJson(kind))?;
    let obj = doc.as_object_mut().ok_or(CopyError::NotJson(kind))?;
    obj.insert("input".into(), input.clone());
    // A map of plain JSON values always serialises.
    Ok(serde_json::to_vec(&doc).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp_types::messaging::{
        AmqpSequence, AmqpValue, ApplicationProperties, MessageAnnotations, Properties,
    };
    use fe2o3_amqp_types::primitives::{Symbol, Timestamp};

    use super::*;

    fn dead_letter(body: Body<Value>) -> Message<Body<Value>> {
        Message {
            header: Some(Header {
                delivery_count: 3,
                ttl: Some(60_000),
                ..Default::default()
            }),
            delivery_annotations: None,
            message_annotations: Some(
                MessageAnnotations::builder()
                    .insert(Symbol::from("x-opt-sequence-number"), Value::Long(7))
                    .insert(
                        Symbol::from("x-opt-enqueued-time"),
                        Value::Timestamp(Timestamp::from_milliseconds(1)),
                    )
                    .insert(
                        Symbol::from("x-opt-partition-key"),
                        Value::String("p".into()),
                    )
                    .build(),
            ),
            properties: Some(Properties {
                message_id: Some(MessageId::String("m1".into())),
                correlation_id: Some(MessageId::Ulong(9)),
                subject: Some("label".into()),
                group_id: Some("s1".into()),
                ..Default::default()
            }),
            application_properties: Some(
                ApplicationProperties::builder()
                    .insert(REASON, SimpleValue::String("HandlerError".into()))
                    .insert(DESCRIPTION, SimpleValue::String("x".into()))
                    .insert("priority", SimpleValue::Int(5))
                    .insert("ratio", SimpleValue::Double(0.5.into()))
                    .build(),
            ),
            body,
            footer: None,
        }
    }

    #[test]
    fn every_body_type_and_property_is_carried_unchanged() {
        let bodies = [
            Body::Value(AmqpValue(Value::List(vec![
                Value::Int(1),
                Value::from("a"),
            ]))),
            Body::Sequence(vec![AmqpSequence(vec![Value::Bool(true)])].into()),
            Body::Data(vec![Data(Binary::from(vec![0u8, 1, 2]))].into()),
        ];
        for body in bodies {
            let original = dead_letter(body.clone());
            let copy = replay_copy(&original, "job-1", 7, None).expect("copy");
            assert_eq!(copy.body, body);
            let p = copy.properties.as_ref().expect("properties");
            assert_eq!(
                p.message_id,
                Some(MessageId::String("job-1:replay-7".into()))
            );
            assert_eq!(p.correlation_id, Some(MessageId::Ulong(9)));
            assert_eq!(p.subject.as_deref(), Some("label"));
            assert_eq!(p.group_id.as_deref(), Some("s1"));
            let app = &copy.application_properties.as_ref().expect("app").0;
            assert_eq!(app.get("priority"), Some(&SimpleValue::Int(5)));
            assert_eq!(app.get("ratio"), Some(&SimpleValue::Double(0.5.into())));
            assert_eq!(
                app.get(JOB_ID_PROPERTY),
                Some(&SimpleValue::String("job-1".into()))
            );
            assert!(app.get(REASON).is_none() && app.get(DESCRIPTION).is_none());
            let ann = &copy.message_annotations.as_ref().expect("annotations").0;
            assert_eq!(ann.len(), 1, "only the sender's annotation stays: {ann:?}");
            let header = copy.header.as_ref().expect("header");
            assert_eq!((header.delivery_count, header.ttl), (0, Some(60_000)));
        }
    }

    #[test]
    fn empty_bodies_are_refused_and_edits_need_a_json_object() {
        for empty in [
            Body::Empty,
            Body::Data(vec![Data(Binary::from(vec![]))].into()),
        ] {
            assert!(matches!(
                replay_copy(&dead_letter(empty), "j", 1, None),
                Err(CopyError::EmptyBody)
            ));
        }
        let value = dead_letter(Body::Value(AmqpValue(Value::from("{}"))));
        assert!(matches!(
            replay_copy(&value, "j", 1, Some(&Json::Null)),
            Err(CopyError::NotJson("an AMQP value"))
        ));
        let json = dead_letter(Body::Data(
            vec![Data(Binary::from(br#"{"worker":"w","input":1}"#.to_vec()))].into(),
        ));
        let copy = replay_copy(&json, "j", 1, Some(&serde_json::json!({"x": 2}))).expect("copy");
        let bytes = body_bytes(&copy.body).expect("data");
        let doc: Json = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(doc, serde_json::json!({"worker": "w", "input": {"x": 2}}));
    }
}
