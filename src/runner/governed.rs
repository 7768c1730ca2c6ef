//! A job's secrets, scrubbing and tokens, as the runner applies them (docs/secrets.md): the
//! declared secrets read at the job's start (a missing one fails it with `PolicyDenied` before
//! its process starts), the fields of the job document that carry them, and the scrubbing of
//! everything the job sent back.

use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::output::{Captured, LogRecord};
use super::{RunOutcome, RunRequest};
use crate::job::{ErrorKind, JobError};
use crate::secrets::scrub::{Scrubber, SharedScrubber};
use crate::secrets::tokens::{ASKS_IN_FLIGHT, JobTokens, TokenAsk, TokenService};
use crate::secrets::{Governance, read_for_job};

/// One job's share of the daemon's governance.
pub(super) struct JobGovernance {
    /// The values of the job's secrets, and of each token handed to it.
    scrubber: SharedScrubber,
    /// `secrets` and `tokens` of the job document.
    pub fields: Map<String, Value>,
    /// The token service of a job whose worker declares scopes.
    pub tokens: Option<JobTokens>,
}

impl JobGovernance {
    /// Reads the job's declared secrets now; a missing or unreadable one is the job's
    /// `PolicyDenied`, naming it.
    pub fn prepare(governance: &Governance, request: &RunRequest<'_>) -> Result<Self, JobError> {
        let spec = &request.worker.spec;
        let secrets = read_for_job(governance.secrets_dir.as_deref(), &spec.secrets)
            .map_err(|e| JobError::new(ErrorKind::PolicyDenied, e.to_string()).permanent())?;
        let scrubber = Arc::new(Mutex::new(Scrubber::new(&secrets)));
        let mut fields = Map::new();
        let values: Map<String, Value> = secrets
            .values
            .into_iter()
            .map(|(name, value)| (name, Value::String(value)))
            .collect();
        fields.insert("secrets".into(), Value::Object(values));
        fields.insert(
            "azure_scopes".into(),
            Value::from(spec.azure_scopes.clone()),
        );
        let tokens = (!spec.azure_scopes.is_empty()).then(|| JobTokens {
            broker: governance.tokens.clone(),
            job_id: request.job_id.to_owned(),
            worker: request.worker.name.clone(),
            allowed: spec.azure_scopes.clone(),
            scrubber: Some(scrubber.clone()),
        });
        Ok(Self {
            scrubber,
            fields,
            tokens,
        })
    }

    /// The channel between the job's channel reader and its token service, for a job whose
    /// worker declares scopes.
    pub fn token_channel(&mut self) -> (Option<mpsc::Sender<TokenAsk>>, Option<TokenService>) {
        match self.tokens.take() {
            Some(tokens) => {
                let (tx, rx) = mpsc::channel(ASKS_IN_FLIGHT);
                (Some(tx), Some((rx, tokens)))
            }
            None => (None, None),
        }
    }

    /// The scrubber as it is now (tokens are added to it as they are handed out).
    /// Scrubs `value` too, as `[redacted:<name>]` (the job's egress proxy credential).
    pub fn also_scrub(&self, name: &str, value: &str) {
        self.scrubber().add(name, value);
    }

    fn scrubber(&self) -> std::sync::MutexGuard<'_, Scrubber> {
        self.scrubber.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A log record with the values replaced.
    pub fn log(&self, mut record: LogRecord) -> LogRecord {
        let scrubber = self.scrubber();
        if !scrubber.is_empty() {
            // Every field: a job may write its channel's lines itself.
            record.msg = scrubber.message(&record.msg);
            record.logger = scrubber.text(&record.logger).into_owned();
            record.level = scrubber.text(&record.level).into_owned();
        }
        record
    }

    /// Captured output with the values replaced (a value cut at the cap included).
    pub fn captured(&self, captured: Captured) -> Captured {
        let scrubber = self.scrubber();
        if scrubber.is_empty() {
            return captured;
        }
        let cut = captured.truncated();
        let dropped = captured.total - captured.kept.len() as u64;
        let kept = scrubber.bytes(&captured.kept, cut);
        // What was dropped stays counted as dropped, whatever the replacements' lengths.
        Captured {
            total: kept.len() as u64 + dropped,
            kept,
        }
    }

    /// The outcome with the values replaced in the result and the error message.
    pub fn outcome(&self, outcome: RunOutcome) -> RunOutcome {
        let scrubber = self.scrubber();
        if scrubber.is_empty() {
            return outcome;
        }
        match outcome {
            RunOutcome::Succeeded(value) => RunOutcome::Succeeded(scrubber.value(value)),
            RunOutcome::Failed(error) => RunOutcome::Failed(scrubber.error(error)),
            other => other,
        }
    }
}
