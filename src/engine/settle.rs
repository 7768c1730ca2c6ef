//! The one place where a job's outcome becomes broker actions.
//!
//! | outcome                              | actions, in order                                  |
//! |--------------------------------------|----------------------------------------------------|
//! | succeeded                            | reply (succeeded) → complete                       |
//! | retryable failure, attempts left     | scheduled copy (attempt + 1, backoff) → complete   |
//! | retryable failure, no attempts left  | reply (MaxAttemptsExceeded) → dead-letter          |
//! | permanent failure                    | reply (its kind) → dead-letter (its kind)          |
//! | lock lost                            | nothing: the broker redelivers                     |
//! | interrupted by shutdown              | abandon: redelivered at once                       |
//! | the daemon could not start it        | abandon: run again (here or by another replica)    |
//! | reply not sent (after the job ran)   | dead-letter `ReplyUndeliverable`, result kept      |
//!
//! Every send comes before the settlement it protects, so a crash between the two leaves the
//! message to be redelivered (a resent reply carries the same MessageId, which duplicate
//! detection drops). If a retry copy cannot be scheduled, the message is abandoned rather than
//! settled. If a reply cannot be sent, the job has run: it is dead-lettered with its result
//! rather than run again. Replies go only where [`reply_queue`] allows: the daemon sends with
//! its own identity, so a job may not choose any queue (a job naming another is refused with
//! `PolicyDenied` before it runs, and gets no reply).

use std::time::Duration;

use serde_json::Value;

use crate::broker::{Broker, BrokerError, Delivery, OutgoingMessage};
use crate::job::{
    ATTEMPT_PROPERTY, Envelope, ErrorKind, JOB_ID_PROPERTY, JobError, JobResult, Resources,
    one_line,
};

use super::executor::WorkerPolicy;
use super::retry::delay_before;
use crate::storage::ResultBlobs;

/// The DeadLetterReason of a job whose reply could not be sent.
pub const REPLY_UNDELIVERABLE: &str = "ReplyUndeliverable";
/// Largest result (JSON) kept on such a dead letter, as its `result` property (Service Bus
/// allows 64 KB of properties); of a larger one, only its status and size are kept.
const MAX_KEPT_RESULT: usize = 32 * 1024;

/// Longest `DeadLetterErrorDescription` written (Service Bus allows far more; a one-line
/// summary is what an operator scans).
pub const MAX_DESCRIPTION: usize = 256;

/// How a job ended, as far as settlement is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    Succeeded {
        worker: String,
        output: Value,
        duration: Duration,
        resources: Resources,
        /// What was stored in Blob Storage for the reply (claim-check; empty without it).
        blobs: ResultBlobs,
    },
    Failed {
        /// `None` when the body did not name a worker.
        worker: Option<String>,
        error: JobError,
        /// `None` when the job never reached a worker (its failure is permanent anyway).
        policy: Option<WorkerPolicy>,
        duration: Duration,
        resources: Resources,
    },
    LockLost,
    Interrupted,
    /// The daemon failed to start the job (`crate::runner::DaemonFault`): the job is not to
    /// blame, so nothing is replied and no attempt is counted.
    DaemonFault {
        worker: String,
    },
}

impl JobEnd {
    /// A job refused before it ran (no reply allowed where it asked, a body that does not
    /// parse, a worker that may not run): a permanent failure with nothing spent.
    pub fn refused(worker: Option<String>, error: JobError) -> JobEnd {
        JobEnd::Failed {
            worker,
            error,
            policy: None,
            duration: Duration::ZERO,
            resources: Resources::default(),
        }
    }
}

/// What settlement did, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    Replied,
    RetryScheduled {
        attempt: u32,
        delay: Duration,
    },
    DeadLettered {
        reason: ErrorKind,
    },
    Abandoned,
    /// Abandoned because of a fault of the daemon's own.
    AbandonedAfterDaemonFault,
    LeftToExpire,
    /// The job ran, its reply could not be sent, and it was dead-lettered with its result.
    ReplyUndeliverable,
}

/// Where replies go when a job names no `ReplyTo`, where else they may go, and where retries
/// are scheduled.
#[derive(Debug, Clone)]
pub struct Queues {
    pub jobs: String,
    pub results: String,
    /// Queues besides `results` a job's `ReplyTo` may name (`queues.reply_allowed`).
    pub reply_allowed: Vec<String>,
}

/// The queue a job's reply goes to: its `ReplyTo` when that is the results queue or an allowed
/// one (names compare case-insensitively, as Service Bus does), the results queue when it
/// names none; `PolicyDenied` for any other.
pub fn reply_queue<'a>(queues: &'a Queues, envelope: &Envelope) -> Result<&'a str, JobError> {
    let Some(asked) = envelope.reply.queue.as_deref() else {
        return Ok(&queues.results);
    };
    std::iter::once(&queues.results)
        .chain(&queues.reply_allowed)
        .find(|q| q.eq_ignore_ascii_case(asked))
        .map(String::as_str)
        .ok_or_else(|| {
            JobError::new(
                ErrorKind::PolicyDenied,
                format!(
                    "ReplyTo {:?} is not a queue replies may go to (queues.results, queues.reply_allowed)",
                    one_line(asked, 100)
                ),
            )
        })
}

/// Maps an outcome to broker actions and performs them. Errors are returned after the
/// message was abandoned (when a send failed) so that nothing is settled on a failed send.
pub async fn settle(
    broker: &dyn Broker,
    queues: &Queues,
    delivery: &Delivery,
    envelope: &Envelope,
    outcome: JobEnd,
) -> Result<Settled, BrokerError> {
    let token = delivery.lock_token;
    match outcome {
        JobEnd::LockLost => Ok(Settled::LeftToExpire),
        JobEnd::Interrupted => broker.abandon(token).await.map(|()| Settled::Abandoned),
        JobEnd::DaemonFault { .. } => broker
            .abandon(token)
            .await
            .map(|()| Settled::AbandonedAfterDaemonFault),
        JobEnd::Succeeded {
            worker,
            output,
            duration,
            resources,
            blobs,
        } => {
            let mut result =
                JobResult::succeeded(envelope, &worker, output, millis(duration), resources);
            // Claim-check: the blobs were written before this reply, which lists them.
            result.output_blob = blobs.output_blob;
            result.artifacts = blobs.artifacts;
            if let Some(settled) = send_reply(broker, queues, envelope, token, &result).await? {
                return Ok(settled);
            }
            broker.complete(token).await?;
            Ok(Settled::Replied)
        }
        JobEnd::Failed {
            worker,
            error,
            policy,
            duration,
            resources,
        } => {
            let retry_with = policy
                .as_ref()
                .filter(|p| error.retryable && envelope.attempt < p.max_attempts);
            if let Some(policy) = retry_with {
                let next = envelope.attempt + 1;
                let delay = delay_before(&policy.retry, next);
                let copy = retry_copy(delivery, envelope, next);
                if let Err(e) = broker.schedule(&queues.jobs, copy, delay).await {
                    abandon_after_failed_send(broker, token).await;
                    return Err(e);
                }
                broker.complete(token).await?;
                return Ok(Settled::RetryScheduled {
                    attempt: next,
                    delay,
                });
            }
            let final_error = if error.retryable {
                let attempts = policy.map_or(envelope.attempt, |p| p.max_attempts);
                JobError::new(
                    ErrorKind::MaxAttemptsExceeded,
                    format!(
                        "gave up after {attempts} attempt(s); the last failed with {}: {}",
                        error.kind, error.message
                    ),
                )
            } else {
                error.clone()
            };
            let result = JobResult::failed(
                envelope,
                worker.as_deref(),
                &final_error,
                millis(duration),
                resources,
            );
            if let Some(settled) = send_reply(broker, queues, envelope, token, &result).await? {
                return Ok(settled);
            }
            let description = dead_letter_description(&final_error, &error, envelope.attempt);
            broker
                .dead_letter(token, final_error.kind.as_str(), &description)
                .await?;
            Ok(Settled::DeadLettered {
                reason: final_error.kind,
            })
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Sends the job's reply where [`reply_queue`] allows (nowhere for a refused `ReplyTo`):
/// `None` when that is done. If the send fails, the job has run all the same, and running it
/// again would not make its reply deliverable: it is dead-lettered with its result kept, and
/// that is the settlement returned.
async fn send_reply(
    broker: &dyn Broker,
    queues: &Queues,
    envelope: &Envelope,
    token: uuid::Uuid,
    result: &JobResult,
) -> Result<Option<Settled>, BrokerError> {
    let Ok(queue) = reply_queue(queues, envelope) else {
        return Ok(None);
    };
    let e = match broker.send(queue, reply(envelope, result)).await {
        Ok(()) => return Ok(None),
        // A session's lock went before its reply: the session's next holder runs the job
        // again and answers in order; nothing is settled from here.
        Err(BrokerError::LockLost) => return Ok(Some(Settled::LeftToExpire)),
        Err(e) => e,
    };
    // A JobResult of plain JSON values always serialises. It goes on the dead letter (access
    // controlled like the job), not into the log: outputs may hold the job's data.
    let json = serde_json::to_string(result).unwrap_or_default();
    tracing::warn!(queue, error = %e, "The reply could not be sent; the job is dead-lettered with its result.");
    let mut keep = std::collections::BTreeMap::new();
    keep.insert(
        "result_status".to_owned(),
        result.status.as_str().to_owned(),
    );
    keep.insert("result_bytes".to_owned(), json.len().to_string());
    if json.len() <= MAX_KEPT_RESULT {
        keep.insert("result".to_owned(), json);
    }
    let description = one_line(
        &format!(
            "the job {}; its reply to {queue} could not be sent: {e}",
            result.status.as_str()
        ),
        MAX_DESCRIPTION,
    );
    broker
        .dead_letter_keeping(token, REPLY_UNDELIVERABLE, &description, &keep)
        .await?;
    Ok(Some(Settled::ReplyUndeliverable))
}

async fn abandon_after_failed_send(broker: &dyn Broker, token: uuid::Uuid) {
    if let Err(e) = broker.abandon(token).await {
        // The lock runs out on its own; the message is redelivered then.
        tracing::warn!(error = %e, "Abandoning the job after a failed send failed too.");
    }
}

/// The reply of `docs/contracts.md` §2: CorrelationId = job id, SessionId = the flow's session (or the
/// job id), MessageId derived from the job message's MessageId (`<message id>:result`), and the
/// status in application properties.
pub fn reply(envelope: &Envelope, result: &JobResult) -> OutgoingMessage {
    let mut application = std::collections::BTreeMap::new();
    application.insert("status".to_owned(), result.status.as_str().to_owned());
    application.insert("job_id".to_owned(), result.job_id.clone());
    if let Some(worker) = &result.worker {
        application.insert("worker".to_owned(), worker.clone());
    }
    OutgoingMessage {
        message_id: Some(format!("{}:result", envelope.message_id)),
        correlation_id: Some(envelope.job_id.clone()),
        session_id: Some(envelope.reply.session_id.clone()),
        content_type: Some("application/json".to_owned()),
        application,
        // A JobResult of plain JSON values always serialises.
        body: serde_json::to_vec(result).unwrap_or_default(),
        ..Default::default()
    }
}

/// The scheduled copy of a job for its next attempt: same body and properties, the attempt
/// number and original job id as application properties, and a MessageId of its own so that
/// duplicate detection on the jobs queue does not drop it.
fn retry_copy(delivery: &Delivery, envelope: &Envelope, next_attempt: u32) -> OutgoingMessage {
    let props = &delivery.properties;
    let mut application = props.application.clone();
    application.insert(ATTEMPT_PROPERTY.to_owned(), next_attempt.to_string());
    application.insert(JOB_ID_PROPERTY.to_owned(), envelope.job_id.clone());
    OutgoingMessage {
        message_id: Some(format!("{}:attempt-{next_attempt}", envelope.job_id)),
        correlation_id: props.correlation_id.clone(),
        session_id: None,
        reply_to: props.reply_to.clone(),
        reply_to_session_id: props.reply_to_session_id.clone(),
        content_type: props.content_type.clone(),
        application,
        body: delivery.body.clone(),
    }
}

/// A one-line description without payload contents: the daemon's own messages are safe to
/// quote; a handler's exception text may hold input data, so only its kind is named.
fn dead_letter_description(final_error: &JobError, cause: &JobError, attempt: u32) -> String {
    let daemon_written =
        |e: &JobError| !matches!(e.kind, ErrorKind::InvalidInput | ErrorKind::HandlerError);
    let text = match final_error.kind {
        ErrorKind::MaxAttemptsExceeded if daemon_written(cause) => {
            format!(
                "gave up after attempt {attempt}; last failure {}: {}",
                cause.kind, cause.message
            )
        }
        ErrorKind::MaxAttemptsExceeded => {
            format!(
                "gave up after attempt {attempt}; last failure {}",
                cause.kind
            )
        }
        ErrorKind::InvalidInput => format!("the handler rejected the input (attempt {attempt})"),
        ErrorKind::HandlerError => {
            format!("the handler raised a permanent error (attempt {attempt})")
        }
        _ => format!("{} (attempt {attempt})", final_error.message),
    };
    one_line(&text, MAX_DESCRIPTION)
}
