//! From a parsed job to a finished run: pick the worker, check policy and venv, and run the
//! job's process. The engine sees only the [`Executor`] trait, so its tests can replace process
//! runs with scripted ones on a paused clock.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::job::{ErrorKind, Job, JobError};
use crate::runner::output::LogRecord;
use crate::runner::{JobFiles, RunReport, RunRequest, Runner};
use crate::storage::Storage;
use crate::worker::{Catalog, RetryPolicy, Worker};

use super::claim::{self, Claim};

/// What the engine needs of a worker to settle its jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerPolicy {
    pub max_attempts: u32,
    pub retry: RetryPolicy,
}

/// Runs jobs. `policy` is asked before a job runs and refuses jobs that cannot run here.
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// The worker's settlement policy, or why this job cannot run here (`UnknownWorker`,
    /// `PolicyDenied`).
    fn policy(&self, job: &Job) -> Result<WorkerPolicy, JobError>;
    /// Runs the job until it ends or `stop` is cancelled.
    async fn execute(&self, job: &Job, stop: CancellationToken) -> RunReport;
}

/// A worker the daemon can run: loaded, allowed, and with a verified venv.
#[derive(Debug, Clone)]
pub struct ReadyWorker {
    pub worker: Worker,
    pub python: PathBuf,
}

/// Runs each job as a process of its worker's venv interpreter.
#[derive(Debug)]
pub struct ProcessExecutor {
    ready: BTreeMap<String, ReadyWorker>,
    /// Workers found but not allowed by `workers.allow`: their jobs get `PolicyDenied`.
    denied: Vec<String>,
    runner: Arc<Runner>,
    /// Claim-check Blob Storage, when configured ([`super::claim`]).
    storage: Option<Arc<Storage>>,
}

impl ProcessExecutor {
    /// `ready` are the workers that may run; `catalog` tells apart denied and unknown names.
    /// Logs, for each worker, each sandbox mechanism that is not enforced on this machine.
    pub fn new(ready: Vec<ReadyWorker>, catalog: &Catalog, runner: Runner) -> Self {
        for r in &ready {
            if let crate::worker::NetworkPolicy::List(_) = &r.worker.limits().network {
                tracing::info!(worker = %r.worker.name, egress = %r.worker.limits().network, "The worker's jobs may reach only these destinations, through the daemon's egress proxy.");
            }
            for e in runner.enforcement(&r.worker, &r.python) {
                if e.on {
                    tracing::debug!(worker = %r.worker.name, mechanism = e.mechanism, detail = %e.detail, "Sandbox mechanism enforced.");
                } else {
                    tracing::warn!(worker = %r.worker.name, mechanism = e.mechanism, detail = %e.detail, "Sandbox mechanism NOT enforced for this worker's jobs.");
                }
            }
        }
        let ready: BTreeMap<String, ReadyWorker> = ready
            .into_iter()
            .map(|r| (r.worker.name.clone(), r))
            .collect();
        let denied = catalog
            .names()
            .into_iter()
            .filter(|n| !ready.contains_key(n))
            .collect();
        // Fork-mode workers: start their warm parents now rather than at their first job.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            for r in ready.values().cloned() {
                let runner = runner.clone();
                handle.spawn(async move { runner.warm_up(&r.worker, &r.python).await });
            }
        }
        Self {
            ready,
            denied,
            runner: Arc::new(runner),
            storage: None,
        }
    }

    /// Jobs may name an input blob, and large outputs and artifacts are stored in `storage`.
    pub fn with_storage(mut self, storage: Option<Arc<Storage>>) -> Self {
        self.storage = storage;
        self
    }

    pub fn worker_names(&self) -> Vec<String> {
        self.ready.keys().cloned().collect()
    }
}

#[async_trait]
impl Executor for ProcessExecutor {
    fn policy(&self, job: &Job) -> Result<WorkerPolicy, JobError> {
        match self.ready.get(&job.worker) {
            Some(ready) => {
                // Claim-check: a blob the job may not name is refused before anything is fetched.
                claim::check_input(self.storage.as_deref(), job)?;
                Ok(WorkerPolicy {
                    max_attempts: ready.worker.limits().max_attempts,
                    retry: ready.worker.spec.retry.clone(),
                })
            }
            None if self.denied.contains(&job.worker) => Err(JobError::new(
                ErrorKind::PolicyDenied,
                format!(
                    "worker {:?} is not allowed to run on this daemon",
                    job.worker
                ),
            )),
            None => Err(JobError::new(
                ErrorKind::UnknownWorker,
                format!("no worker named {:?} on this daemon", job.worker),
            )),
        }
    }

    async fn execute(&self, job: &Job, stop: CancellationToken) -> RunReport {
        let storage = self.storage.as_deref();
        // Claim-check, step 1 (before the run): the job's staging folder and its input blob.
        let temp_base = self.runner.temp_base();
        let claim = match claim::fetch_input(storage, job, temp_base, &stop).await {
            Ok(claim) => claim,
            Err(report) => return report,
        };
        let files = claim.as_ref().map(Claim::files).unwrap_or_default();
        let report = self.execute_with_files(job, files, stop.clone()).await;
        // Claim-check, step 2 (after the run, before the reply): large output and artifacts.
        let inline_limit = self
            .ready
            .get(&job.worker)
            .map_or(0, |r| r.worker.limits().max_result_kb * 1024);
        claim::store_results(storage, job, claim, inline_limit, &stop, report).await
    }
}

impl ProcessExecutor {
    /// Runs the job's process with `files` (an input to hand it, its output folder to keep):
    /// what [`Executor::execute`] does between its claim-check steps, and what `exec` runs
    /// with a local file.
    pub async fn execute_with_files(
        &self,
        job: &Job,
        files: JobFiles<'_>,
        stop: CancellationToken,
    ) -> RunReport {
        let Some(ready) = self.ready.get(&job.worker) else {
            let error = match self.policy(job) {
                Err(e) => e,
                Ok(_) => JobError::new(ErrorKind::UnknownWorker, "the worker disappeared"),
            };
            return RunReport::failed_to_start(error);
        };
        let limit = ready.worker.limits().timeout();
        let timeout = job
            .timeout_s
            .map(Duration::from_secs_f64)
            .map_or(limit, |t| t.min(limit));
        let mut extra_env = Vec::new();
        if let Some(tp) = &job.envelope.traceparent {
            extra_env.push(("TRACEPARENT".to_owned(), tp.clone()));
        }
        if let Some(run_id) = &job.envelope.flow_run_id {
            extra_env.push(("HYBRID_FLOW_RUN_ID".to_owned(), run_id.clone()));
        }
        let request = RunRequest {
            worker: &ready.worker,
            python: ready.python.clone(),
            job_id: &job.envelope.job_id,
            attempt: job.envelope.attempt,
            correlation_id: job.envelope.correlation_id.as_deref(),
            input: &job.input,
            timeout,
            extra_env,
        };
        let report = self
            .runner
            .run_with_files(request, files, stop, &forward_log)
            .await;
        if report.dropped_logs > 0 {
            tracing::warn!(
                dropped = report.dropped_logs,
                "The handler logged more than its output limit; lines were dropped."
            );
        }
        if report.stderr.total > 0 {
            tracing::debug!(stderr = %report.stderr.text(), "The handler wrote to stderr.");
        }
        if let Some(usage) = report.cgroup {
            tracing::debug!(
                memory_peak_kb = usage.memory_peak_bytes.map(|b| b / 1024),
                oom_kills = usage.oom_kills,
                oom_group_kills = usage.oom_group_kills,
                "The job's cgroup accounting."
            );
        }
        report
    }
}

/// Emits a handler's log record as a structured event inside the job's span, so it carries the
/// job's ids.
pub fn forward_log(record: LogRecord) {
    let LogRecord { level, logger, msg } = record;
    match level.as_str() {
        "CRITICAL" | "ERROR" => tracing::error!(target: "worker", logger = %logger, "{msg}"),
        "WARNING" => tracing::warn!(target: "worker", logger = %logger, "{msg}"),
        "DEBUG" => tracing::debug!(target: "worker", logger = %logger, "{msg}"),
        _ => tracing::info!(target: "worker", logger = %logger, "{msg}"),
    }
}

/// Input of a job given directly (by `exec`), wrapped as the job body would carry it.
pub fn job_body(worker: &str, input: &Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "worker": worker, "input": input })).unwrap_or_default()
}
