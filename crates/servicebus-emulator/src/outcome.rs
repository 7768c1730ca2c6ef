//! The one mapping between AMQP delivery states and broker outcomes (§5.1): what a client's
//! disposition means, and which settled state the broker answers with.

use fe2o3_amqp_types::definitions::{Error as AmqpError, ErrorCondition};
use fe2o3_amqp_types::messaging::{Accepted, DeliveryState, Modified, Rejected, Released};
use fe2o3_amqp_types::primitives::{SimpleValue, Symbol, Value};

use super::error::SbError;
use super::queue::Settlement;

const DEAD_LETTER: &str = "com.microsoft:dead-letter";

/// The broker outcome of a client's delivery state; `None` for non-terminal states.
/// `settled` without a state means the default outcome, `accepted`.
pub fn outcome_of(state: Option<&DeliveryState>, settled: bool) -> Option<Settlement> {
    Some(match state {
        None if settled => Settlement::Complete,
        None | Some(DeliveryState::Received(_)) => return None,
        Some(DeliveryState::Accepted(_)) => Settlement::Complete,
        Some(DeliveryState::Released(_)) => Settlement::Release,
        Some(DeliveryState::Modified(m)) => {
            let props = annotation_props(m.message_annotations.as_ref());
            if m.undeliverable_here == Some(true) {
                Settlement::Defer(props)
            } else {
                Settlement::Abandon(props)
            }
        }
        Some(DeliveryState::Rejected(r)) => dead_letter_of(r.error.as_ref()),
        #[allow(unreachable_patterns)]
        Some(_) => return None,
    })
}

/// The settled state the broker sends back once `outcome` was applied (or failed).
pub fn reply_state(sent: Option<&DeliveryState>, result: &Result<(), SbError>) -> DeliveryState {
    if let Err(e) = result {
        return DeliveryState::Rejected(Rejected {
            error: Some(e.to_amqp()),
        });
    }
    match sent {
        Some(DeliveryState::Modified(m)) => DeliveryState::Modified(Modified {
            delivery_failed: m.delivery_failed,
            undeliverable_here: m.undeliverable_here,
            message_annotations: None,
        }),
        // Dead-letter succeeded: `rejected` with a null error (§0.2).
        Some(DeliveryState::Rejected(_)) => DeliveryState::Rejected(Rejected { error: None }),
        Some(DeliveryState::Released(_)) => DeliveryState::Released(Released {}),
        _ => DeliveryState::Accepted(Accepted {}),
    }
}

fn dead_letter_of(error: Option<&AmqpError>) -> Settlement {
    let mut reason = None;
    let mut description = None;
    if let Some(err) = error {
        let condition = match &err.condition {
            ErrorCondition::Custom(s) => s.as_str().to_string(),
            other => format!("{other:?}"),
        };
        if let Some(info) = &err.info {
            reason = info.get(&Symbol::from("DeadLetterReason")).and_then(text);
            description = info
                .get(&Symbol::from("DeadLetterErrorDescription"))
                .and_then(text);
        }
        if condition != DEAD_LETTER && reason.is_none() {
            reason = Some(condition);
            description = description.or_else(|| err.description.clone());
        }
    }
    Settlement::DeadLetter {
        reason,
        description,
        props: Vec::new(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn annotation_props(
    fields: Option<&fe2o3_amqp_types::definitions::Fields>,
) -> Vec<(String, SimpleValue)> {
    fields
        .map(|f| {
            f.iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.as_str().to_string(),
                        SimpleValue::try_from(v.clone()).ok()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_reply_has_no_error() {
        let sent = DeliveryState::Rejected(Rejected {
            error: Some(super::super::error::amqp_error(DEAD_LETTER, "why")),
        });
        let reply = reply_state(Some(&sent), &Ok(()));
        assert!(matches!(
            reply,
            DeliveryState::Rejected(Rejected { error: None })
        ));
        let lost = reply_state(Some(&sent), &Err(SbError::LockLost));
        assert!(matches!(
            lost,
            DeliveryState::Rejected(Rejected { error: Some(_) })
        ));
    }

    #[test]
    fn modified_maps_to_abandon_or_defer() {
        let abandon = DeliveryState::Modified(Modified {
            delivery_failed: Some(true),
            undeliverable_here: Some(false),
            message_annotations: None,
        });
        assert_eq!(
            outcome_of(Some(&abandon), false),
            Some(Settlement::Abandon(Vec::new()))
        );
        let defer = DeliveryState::Modified(Modified {
            delivery_failed: Some(true),
            undeliverable_here: Some(true),
            message_annotations: None,
        });
        assert_eq!(
            outcome_of(Some(&defer), false),
            Some(Settlement::Defer(Vec::new()))
        );
    }
}
