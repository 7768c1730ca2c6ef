//! The job contract of `docs/contracts.md`: what a flow sends, what it gets back, and the error kinds.
//!
//! A broker message becomes a [`Job`] here, or a [`JobError`] of kind `MalformedJob` with a
//! one-line reason. Nothing in this module panics on input: the body and every property come from
//! outside the process.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::storage::results::{Artifact, StoredBlob};

/// Application property carrying the attempt number on a scheduled retry copy.
pub const ATTEMPT_PROPERTY: &str = "attempt";
/// Application property carrying the original job id on a scheduled retry copy, whose own
/// `MessageId` must differ so that duplicate detection does not drop it.
pub const JOB_ID_PROPERTY: &str = "job_id";
/// Application properties that carry a trace context into the job (W3C and Azure SDK forms).
pub const TRACE_PROPERTIES: [&str; 2] = ["traceparent", "Diagnostic-Id"];
/// Application property a flow may set with its run id, carried into every log line.
pub const FLOW_RUN_PROPERTY: &str = "flow_run_id";

/// Why a job ended without success. The name is the `DeadLetterReason` and the `error.kind` of
/// the reply, so the set is closed and each variant is a stable public name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Not JSON, not an object, no `worker`, wrong field types, or a body over the size limit.
    MalformedJob,
    /// The body names a worker this daemon does not have.
    UnknownWorker,
    /// The configuration does not allow this job to run here.
    PolicyDenied,
    /// The handler (or its schema) rejected the input: retrying cannot help.
    InvalidInput,
    /// The handler raised an exception: worth another attempt.
    HandlerError,
    /// The job ran past its deadline and was stopped.
    Timeout,
    /// The job ran out of the memory its worker allows.
    MemoryLimit,
    /// The process died (signal or non-zero exit) without reporting a result.
    Crashed,
    /// The handler returned more than its worker's result limit.
    ResultTooLarge,
    /// A retryable failure happened on the last allowed attempt.
    MaxAttemptsExceeded,
}

impl ErrorKind {
    /// Every kind, for documentation and tests.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::MalformedJob,
        ErrorKind::UnknownWorker,
        ErrorKind::PolicyDenied,
        ErrorKind::InvalidInput,
        ErrorKind::HandlerError,
        ErrorKind::Timeout,
        ErrorKind::MemoryLimit,
        ErrorKind::Crashed,
        ErrorKind::ResultTooLarge,
        ErrorKind::MaxAttemptsExceeded,
    ];

    /// The stable name, as used for `DeadLetterReason` and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::MalformedJob => "MalformedJob",
            ErrorKind::UnknownWorker => "UnknownWorker",
            ErrorKind::PolicyDenied => "PolicyDenied",
            ErrorKind::InvalidInput => "InvalidInput",
            ErrorKind::HandlerError => "HandlerError",
            ErrorKind::Timeout => "Timeout",
            ErrorKind::MemoryLimit => "MemoryLimit",
            ErrorKind::Crashed => "Crashed",
            ErrorKind::ResultTooLarge => "ResultTooLarge",
            ErrorKind::MaxAttemptsExceeded => "MaxAttemptsExceeded",
        }
    }

    /// Whether another attempt could succeed. Failures that depend only on the job and the
    /// worker's code (bad input, too much memory, too large a result) are permanent; failures
    /// that can be transient (an exception, a slow dependency, a crash) are retried.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::HandlerError | ErrorKind::Timeout | ErrorKind::Crashed
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure with its kind and a message for the flow maker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub kind: ErrorKind,
    /// Shown to the flow in the reply; may name fields, but never holds payload contents
    /// beyond what the handler chose to put in its exception.
    pub message: String,
    /// Whether another attempt could help: the kind's default, unless the handler raised a
    /// permanent error (`hybrid_worker.PermanentError`).
    pub retryable: bool,
}

impl JobError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable: kind.is_retryable(),
        }
    }

    /// Marks the failure as one no retry can fix.
    pub fn permanent(mut self) -> Self {
        self.retryable = false;
        self
    }

    fn malformed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::MalformedJob, message)
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for JobError {}

/// The Service Bus properties of a received message that the job contract reads. The broker
/// layer fills it; everything is optional because a producer may omit anything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageProperties {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub reply_to_session_id: Option<String>,
    pub content_type: Option<String>,
    /// User properties, reduced to strings (the contract only reads string-like values).
    pub application: BTreeMap<String, String>,
    /// The broker's sequence number, the fallback identity of a message without a MessageId.
    pub sequence_number: Option<i64>,
}

/// Where and how the answer to a job goes; known even for a job whose body is unusable, so
/// that every job, malformed ones included, gets a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRoute {
    /// The queue named by `ReplyTo`, or `None` for the configured results queue.
    pub queue: Option<String>,
    /// The reply's `SessionId`: the job's `ReplyToSessionId`, else the job id.
    pub session_id: String,
}

/// The identity and tracing context of a message, read before its body is parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The job id: the original job's MessageId (kept across retry copies).
    pub job_id: String,
    /// This message's own MessageId (a retry or replay copy has its own), from which the
    /// reply's MessageId is derived: a redelivery of the same message gets a reply with the
    /// same id (dropped by duplicate detection), a retry or replay gets a new one.
    pub message_id: String,
    pub correlation_id: Option<String>,
    /// 1 for the first run; retry copies carry the next number.
    pub attempt: u32,
    pub reply: ReplyRoute,
    pub traceparent: Option<String>,
    pub flow_run_id: Option<String>,
}

impl Envelope {
    /// Reads the identity of a message. Never fails: a message with no MessageId is named by
    /// its sequence number, and an unreadable attempt number counts as the first attempt.
    pub fn from_properties(props: &MessageProperties) -> Self {
        let job_id = props
            .application
            .get(JOB_ID_PROPERTY)
            .filter(|id| !id.is_empty())
            .cloned()
            .or_else(|| props.message_id.clone().filter(|id| !id.is_empty()))
            .unwrap_or_else(|| match props.sequence_number {
                Some(seq) => format!("seq-{seq}"),
                None => format!("anon-{}", uuid::Uuid::new_v4()),
            });
        let attempt = props
            .application
            .get(ATTEMPT_PROPERTY)
            .and_then(|a| a.trim().parse::<u32>().ok())
            .filter(|a| *a >= 1)
            .unwrap_or(1);
        let session_id = props
            .reply_to_session_id
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| job_id.clone());
        let traceparent = TRACE_PROPERTIES
            .iter()
            .find_map(|key| props.application.get(*key))
            .cloned();
        Self {
            message_id: props
                .message_id
                .clone()
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| job_id.clone()),
            correlation_id: props.correlation_id.clone(),
            attempt,
            reply: ReplyRoute {
                queue: props.reply_to.clone().filter(|q| !q.is_empty()),
                session_id,
            },
            traceparent,
            flow_run_id: props.application.get(FLOW_RUN_PROPERTY).cloned(),
            job_id,
        }
    }
}

/// A validated job, ready for a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub envelope: Envelope,
    /// The worker's name (its folder name), checked to be a plausible name.
    pub worker: String,
    /// What the handler receives as `input`.
    pub input: Value,
    /// The job's own timeout, to be capped by the worker's limit.
    pub timeout_s: Option<f64>,
    /// A blob the daemon fetches into the job's folder before it starts (`ctx.input_path`):
    /// `<container>/<blob name>` or a URL of the configured account (`docs/storage.md`).
    pub input_blob: Option<String>,
}

/// The body fields of the contract; anything else is ignored.
#[derive(Deserialize)]
struct Body {
    worker: Option<Value>,
    #[serde(default)]
    input: Value,
    timeout_s: Option<Value>,
    input_blob: Option<Value>,
}

impl Job {
    /// Parses a job body. `max_body_bytes` bounds what is accepted; the error names the first
    /// problem found in one line, without quoting the payload.
    pub fn parse(envelope: Envelope, body: &[u8], max_body_bytes: usize) -> Result<Job, JobError> {
        if body.len() > max_body_bytes {
            return Err(JobError::malformed(format!(
                "the body has {} bytes, over the limit of {max_body_bytes}",
                body.len()
            )));
        }
        let text = std::str::from_utf8(body).map_err(|e| {
            JobError::malformed(format!(
                "the body is not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        let value: Value = serde_json::from_str(text).map_err(|e| {
            JobError::malformed(format!(
                "the body is not JSON ({} at line {} column {})",
                describe_json_error(&e),
                e.line(),
                e.column()
            ))
        })?;
        if !value.is_object() {
            return Err(JobError::malformed(format!(
                "the body must be a JSON object, not {}",
                json_type(&value)
            )));
        }
        let body: Body = serde_json::from_value(value)
            .map_err(|e| JobError::malformed(format!("the body does not fit the contract: {e}")))?;
        let worker = match body.worker {
            None | Some(Value::Null) => {
                return Err(JobError::malformed(
                    "the body has no \"worker\" field naming the worker to run",
                ));
            }
            Some(Value::String(name)) => name,
            Some(other) => {
                return Err(JobError::malformed(format!(
                    "\"worker\" must be a string, not {}",
                    json_type(&other)
                )));
            }
        };
        if !is_valid_worker_name(&worker) {
            return Err(JobError::malformed(
                "\"worker\" must be 1-64 characters of letters, digits, '-' or '_'",
            ));
        }
        let timeout_s = match body.timeout_s {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(t) if t.is_finite() && t > 0.0 => Some(t),
                _ => {
                    return Err(JobError::malformed(
                        "\"timeout_s\" must be a positive number of seconds",
                    ));
                }
            },
            Some(other) => {
                return Err(JobError::malformed(format!(
                    "\"timeout_s\" must be a number, not {}",
                    json_type(&other)
                )));
            }
        };
        let input_blob = match body.input_blob {
            None | Some(Value::Null) => None,
            Some(Value::String(reference)) if !reference.trim().is_empty() => Some(reference),
            Some(Value::String(_)) => {
                return Err(JobError::malformed(
                    "\"input_blob\" must name a blob as \"<container>/<blob name>\"",
                ));
            }
            Some(other) => {
                return Err(JobError::malformed(format!(
                    "\"input_blob\" must be a string, not {}",
                    json_type(&other)
                )));
            }
        };
        Ok(Job {
            envelope,
            worker,
            input: body.input,
            timeout_s,
            input_blob,
        })
    }
}

/// Worker names are folder names that also appear in metrics and logs, so they are kept plain.
pub fn is_valid_worker_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn describe_json_error(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Eof => "it ends too early",
        Category::Syntax => "syntax error",
        Category::Data => "unexpected data",
        Category::Io => "read error",
    }
}

/// How a job ended, as the reply reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Succeeded,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
        }
    }
}

/// The `error` object of a failed result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultError {
    pub kind: ErrorKind,
    pub message: String,
    pub retryable: bool,
}

/// What a job cost, from the kernel's accounting of its process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_ms: u64,
    pub max_rss_kb: u64,
}

/// The result message body (`docs/contracts.md` §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub job_id: String,
    /// `null` only when the job's body did not name a worker.
    pub worker: Option<String>,
    pub status: Status,
    pub output: Value,
    pub error: Option<ResultError>,
    pub attempt: u32,
    pub duration_ms: u64,
    pub resources: Resources,
    /// Where the output went when it was too large for the reply (`output` is then `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_blob: Option<StoredBlob>,
    /// The files the handler wrote into `ctx.output_dir`, stored as blobs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
}

impl JobResult {
    /// The result of a job that succeeded.
    pub fn succeeded(
        envelope: &Envelope,
        worker: &str,
        output: Value,
        duration_ms: u64,
        resources: Resources,
    ) -> Self {
        Self {
            job_id: envelope.job_id.clone(),
            worker: Some(worker.to_owned()),
            status: Status::Succeeded,
            output,
            error: None,
            attempt: envelope.attempt,
            duration_ms,
            resources,
            output_blob: None,
            artifacts: Vec::new(),
        }
    }

    /// The result of a job that ended in failure (the retryable flag tells the flow whether a
    /// resubmission might help).
    pub fn failed(
        envelope: &Envelope,
        worker: Option<&str>,
        error: &JobError,
        duration_ms: u64,
        resources: Resources,
    ) -> Self {
        Self {
            job_id: envelope.job_id.clone(),
            worker: worker.map(str::to_owned),
            status: Status::Failed,
            output: Value::Null,
            error: Some(ResultError {
                kind: error.kind,
                message: error.message.clone(),
                retryable: error.retryable,
            }),
            attempt: envelope.attempt,
            duration_ms,
            resources,
            output_blob: None,
            artifacts: Vec::new(),
        }
    }
}

/// Bounds a text for `DeadLetterErrorDescription`: one line, at most `max` bytes, cut at a
/// character boundary.
pub fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.len() <= max {
        return flat.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !flat.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &flat[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope::from_properties(&MessageProperties {
            message_id: Some("m-1".into()),
            ..Default::default()
        })
    }

    fn parse(body: &str) -> Result<Job, JobError> {
        Job::parse(envelope(), body.as_bytes(), 1024)
    }

    #[test]
    fn a_valid_body_parses_and_ignores_extra_fields() {
        let job =
            parse(r#"{"worker":"csv-normalize","input":{"a":1},"extra":true}"#).expect("valid job");
        assert_eq!(job.worker, "csv-normalize");
        assert_eq!(job.input, serde_json::json!({"a":1}));
        assert_eq!(job.timeout_s, None);
        assert_eq!(job.input_blob, None);
        let job = parse(r#"{"worker":"w","input_blob":"inputs/a.csv"}"#).expect("with a blob");
        assert_eq!(job.input_blob.as_deref(), Some("inputs/a.csv"));
    }

    #[test]
    fn malformed_bodies_name_the_problem() {
        let cases = [
            ("not json", "not JSON"),
            ("[1,2]", "must be a JSON object, not an array"),
            ("{}", "no \"worker\""),
            (r#"{"worker":3}"#, "must be a string, not a number"),
            (r#"{"worker":"../etc"}"#, "1-64 characters"),
            (r#"{"worker":"w","timeout_s":"x"}"#, "must be a number"),
            (r#"{"worker":"w","timeout_s":-1}"#, "positive number"),
            (
                r#"{"worker":"w","input_blob":7}"#,
                "\"input_blob\" must be a string",
            ),
            (r#"{"worker":"w","input_blob":" "}"#, "must name a blob"),
            ("{\"worker\":", "ends too early"),
        ];
        for (body, expected) in cases {
            let err = parse(body).expect_err(body);
            assert_eq!(err.kind, ErrorKind::MalformedJob, "{body}");
            assert!(err.message.contains(expected), "{body}: {}", err.message);
            assert!(!err.message.contains('\n'));
        }
    }

    #[test]
    fn oversize_and_non_utf8_bodies_are_malformed() {
        let big = format!(r#"{{"worker":"w","input":"{}"}}"#, "x".repeat(2000));
        let err = parse(&big).expect_err("too big");
        assert!(err.message.contains("over the limit of 1024"));
        let err = Job::parse(envelope(), &[0xff, 0xfe], 1024).expect_err("bytes");
        assert!(err.message.contains("not UTF-8"));
    }

    #[test]
    fn envelope_reads_retry_copies_and_reply_routes() {
        let mut props = MessageProperties {
            message_id: Some("job-1:attempt-2".into()),
            reply_to: Some("replies".into()),
            ..Default::default()
        };
        props
            .application
            .insert(JOB_ID_PROPERTY.into(), "job-1".into());
        props
            .application
            .insert(ATTEMPT_PROPERTY.into(), "2".into());
        let env = Envelope::from_properties(&props);
        assert_eq!(env.job_id, "job-1");
        assert_eq!(env.attempt, 2);
        assert_eq!(env.reply.queue.as_deref(), Some("replies"));
        assert_eq!(env.reply.session_id, "job-1");

        props.reply_to_session_id = Some("flow-session".into());
        props
            .application
            .insert(ATTEMPT_PROPERTY.into(), "zero".into());
        let env = Envelope::from_properties(&props);
        assert_eq!(env.reply.session_id, "flow-session");
        assert_eq!(env.attempt, 1);
    }

    #[test]
    fn a_message_without_id_is_named_by_its_sequence_number() {
        let env = Envelope::from_properties(&MessageProperties {
            sequence_number: Some(42),
            ..Default::default()
        });
        assert_eq!(env.job_id, "seq-42");
    }

    #[test]
    fn result_serialises_to_the_contract() {
        let env = envelope();
        let err = JobError::new(ErrorKind::Timeout, "ran past 5s");
        let result = JobResult::failed(&env, Some("w"), &err, 12, Resources::default());
        let json = serde_json::to_value(&result).expect("serialise");
        assert_eq!(
            json,
            serde_json::json!({
                "job_id": "m-1", "worker": "w", "status": "failed", "output": null,
                "error": {"kind": "Timeout", "message": "ran past 5s", "retryable": true},
                "attempt": 1, "duration_ms": 12, "resources": {"cpu_ms": 0, "max_rss_kb": 0}
            })
        );
    }

    #[test]
    fn one_line_flattens_and_bounds() {
        assert_eq!(one_line("a\nb\tc", 100), "a b c");
        let long = "é".repeat(100);
        let cut = one_line(&long, 11);
        assert!(cut.len() <= 11 && cut.ends_with("..."));
    }
}
