//! Reading an entity without locking anything (management `peek-message`), in pages that fit
//! one management response whatever the messages weigh: what the `dlq` tools list, show and
//! select from.
//!
//! A peek response must fit the management link's message size (1 MiB). Service Bus, like the
//! embedded emulator, may return fewer messages than asked for, and callers go on from the
//! last sequence number they got; against a broker that does not, a response over the limit
//! detaches only the management link, and the page is halved for the rest of the walk.

use std::sync::atomic::Ordering;

use fe2o3_amqp::types::primitives::Value;

use super::client::{ServiceBusBroker, retried, status_result};
use super::management::{MgmtRequest, MgmtResponse};
use super::message::{Peeked, decode, peeked};
use crate::broker::BrokerError;

/// Messages asked for by the first peek of a page walk (see `peek_page`).
pub const PEEK_PAGE: i32 = 100;

impl ServiceBusBroker {
    /// Reads up to `count` messages from sequence number `from` on, without locking them
    /// (management `peek-message`). The broker may return fewer (Service Bus caps a response's
    /// size); a response over the link's size limit is an error here, see
    /// [`peek_page`](Self::peek_page).
    pub async fn peek(&self, from: i64, count: i32) -> Result<Vec<Peeked>, BrokerError> {
        let request = peek_request(from, count);
        peeked_messages(&retried(|| self.management(request.clone())).await?)
    }

    /// The next page of messages from sequence number `from` on, however large they are: the
    /// page starts at [`PEEK_PAGE`] messages and halves, for this and every later page,
    /// whenever the response would be larger than the management link allows (1 MiB), down
    /// to one message. Empty when nothing is left.
    pub async fn peek_page(&self, from: i64) -> Result<Vec<Peeked>, BrokerError> {
        loop {
            let count = self.peek_count.load(Ordering::Relaxed);
            let request = peek_request(from, count);
            match retried(|| self.management_sized(request.clone())).await? {
                Ok(response) => return peeked_messages(&response),
                Err(too_large) if count > 1 => {
                    let smaller = (count / 2).max(1);
                    tracing::info!(
                        from,
                        count,
                        smaller,
                        size = too_large.size,
                        max = too_large.max_size,
                        "A peek response was too large; peeking fewer messages at a time."
                    );
                    self.peek_count.store(smaller, Ordering::Relaxed);
                }
                Err(too_large) => {
                    return Err(BrokerError::Refused(format!(
                        "the message at sequence number {from} or after is too large to peek: \
                         {} bytes, over the management link's limit of {} bytes",
                        too_large.size, too_large.max_size
                    )));
                }
            }
        }
    }
}

fn peek_request(from: i64, count: i32) -> MgmtRequest {
    MgmtRequest::new("com.microsoft:peek-message")
        .with("from-sequence-number", Value::Long(from))
        .with("message-count", Value::Int(count))
}

/// The messages of a peek response; none for 204 (nothing left).
fn peeked_messages(response: &MgmtResponse) -> Result<Vec<Peeked>, BrokerError> {
    if response.status == 204 {
        return Ok(Vec::new());
    }
    status_result(response)?;
    let items: Vec<Value> = match response.field("messages") {
        Some(Value::List(list)) => list.clone(),
        Some(Value::Array(array)) => array.iter().cloned().collect(),
        _ => Vec::new(),
    };
    Ok(items
        .iter()
        .filter_map(|item| match item {
            Value::Map(map) => map.iter().find_map(|(k, v)| match (k, v) {
                (Value::String(k), Value::Binary(b)) if k == "message" => decode(b.as_ref()),
                _ => None,
            }),
            _ => None,
        })
        .map(peeked)
        .collect())
}
