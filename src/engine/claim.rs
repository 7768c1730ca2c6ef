//! The claim-check steps around a job's run (`docs/storage.md`): before it, the blob the job
//! names is fetched into a staging folder of the daemon's, which the runner hands to the job;
//! after it, an output too large for the reply and the files the handler wrote are uploaded,
//! so that the reply (sent after this step) can list them.
//!
//! Each step ends in the job's own failure when the job is at fault (a refused or missing
//! blob: `PolicyDenied`, `InvalidInput`) and in [`RunOutcome::DaemonFault`] when the daemon is
//! (storage unreachable, its disk): the job is then delivered again rather than failed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::job::{ErrorKind, Job, JobError};
use crate::runner::{DaemonFault, FaultStage, JobFiles, RunOutcome, RunReport};
use crate::storage::results::list_outputs;
use crate::storage::{Storage, StorageError};

/// The job's staging folder (under the runner's temp folder, so files move by renaming), and
/// its input once fetched. Removed when dropped.
#[derive(Debug)]
pub struct Claim {
    staging: tempfile::TempDir,
    input: Option<PathBuf>,
    /// `<staging>/output`, never created here: the runner moves the job's output folder there.
    outputs: PathBuf,
    max_result_bytes: u64,
}

impl Claim {
    /// What the runner hands the job and keeps from it.
    pub fn files(&self) -> JobFiles<'_> {
        JobFiles {
            input: self.input.as_deref(),
            keep_outputs: Some(&self.outputs),
            max_result_bytes: Some(self.max_result_bytes),
        }
    }
}

/// Why `input_blob` cannot be used on a daemon without storage.
pub fn storage_missing() -> JobError {
    JobError::new(
        ErrorKind::PolicyDenied,
        "the job names input_blob, but this daemon has no Blob Storage: set \
         storage.connection_string or storage.account_url (HYBRID__STORAGE__CONNECTION_STRING / \
         HYBRID__STORAGE__ACCOUNT_URL)",
    )
}

/// Whether the job may name its `input_blob` here (`PolicyDenied` if not): checked before
/// anything is fetched.
pub fn check_input(storage: Option<&Storage>, job: &Job) -> Result<(), JobError> {
    match (storage, &job.input_blob) {
        (_, None) => Ok(()),
        (None, Some(_)) => Err(storage_missing()),
        (Some(storage), Some(reference)) => storage
            .resolve_input(reference)
            .map(|_| ())
            .map_err(|e| JobError::new(ErrorKind::PolicyDenied, e.to_string())),
    }
}

/// Step 1, before the job's process starts: with storage, the job's staging folder and its
/// input blob (`None` without storage). `Err` is the report the run ends with instead.
pub async fn fetch_input(
    storage: Option<&Storage>,
    job: &Job,
    temp_base: &Path,
    stop: &CancellationToken,
) -> Result<Option<Claim>, RunReport> {
    let Some(storage) = storage else {
        return match job.input_blob {
            Some(_) => Err(RunReport::failed_to_start(storage_missing())),
            None => Ok(None),
        };
    };
    fetch(storage, job, temp_base, stop)
        .await
        .map(Some)
        .map_err(RunReport::without_process)
}

async fn fetch(
    storage: &Storage,
    job: &Job,
    temp_base: &Path,
    stop: &CancellationToken,
) -> Result<Claim, RunOutcome> {
    let staging = tempfile::Builder::new()
        .prefix("hybrid-claim-")
        .tempdir_in(temp_base)
        .map_err(|e| {
            RunOutcome::DaemonFault(DaemonFault::new(
                FaultStage::TempFolder,
                format!(
                    "cannot create a staging folder under {}: {e}",
                    temp_base.display()
                ),
            ))
        })?;
    let mut claim = Claim {
        outputs: staging.path().join("output"),
        staging,
        input: None,
        max_result_bytes: storage.max_result_bytes(),
    };
    let Some(reference) = &job.input_blob else {
        return Ok(claim);
    };
    let blob = storage.resolve_input(reference).map_err(ended)?;
    let folder = claim.staging.path().join("input");
    std::fs::create_dir(&folder).map_err(|e| {
        RunOutcome::DaemonFault(DaemonFault::new(
            FaultStage::TempFolder,
            format!("cannot create {}: {e}", folder.display()),
        ))
    })?;
    let dest = folder.join(blob.file_name());
    let started = Instant::now();
    let fetched = tokio::select! {
        fetched = storage.download(&blob, &dest) => fetched.map_err(ended)?,
        () = stop.cancelled() => return Err(RunOutcome::Stopped),
    };
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        blob = %blob.path(),
        bytes = fetched.bytes,
        sha256 = %fetched.sha256,
        mb_per_s = fetched.bytes as f64 / 1_048_576.0 / seconds.max(1e-6),
        "Fetched the job's input blob."
    );
    claim.input = Some(fetched.path);
    Ok(claim)
}

/// Step 2, after the job's process ended and before its reply: uploads what a succeeded job
/// produced and records it in the report. `inline_limit` is the worker's `max_result_kb` in
/// bytes; a larger output goes to `result.json`.
pub async fn store_results(
    storage: Option<&Storage>,
    job: &Job,
    claim: Option<Claim>,
    inline_limit: u64,
    stop: &CancellationToken,
    mut report: RunReport,
) -> RunReport {
    let (Some(storage), Some(claim), RunOutcome::Succeeded(output)) =
        (storage, claim, &report.outcome)
    else {
        return report;
    };
    if let Some(why) = report.outputs_error.take() {
        report.outcome = RunOutcome::DaemonFault(DaemonFault::new(FaultStage::TempFolder, why));
        return report;
    }
    let outputs = match list_outputs(&claim.outputs) {
        Ok(outputs) => outputs,
        Err(error) => {
            report.outcome = RunOutcome::Failed(error);
            return report;
        }
    };
    let started = Instant::now();
    let stored = tokio::select! {
        stored = storage.store_results(&job.envelope.job_id, output.clone(), inline_limit, &outputs) => stored,
        () = stop.cancelled() => {
            report.outcome = RunOutcome::Stopped;
            return report;
        }
    };
    match stored {
        Ok((output, blobs)) => {
            if blobs.output_blob.is_some() || !blobs.artifacts.is_empty() {
                let bytes: u64 = blobs
                    .output_blob
                    .iter()
                    .map(|b| b.bytes)
                    .chain(blobs.artifacts.iter().map(|a| a.blob.bytes))
                    .sum();
                tracing::info!(
                    output_blob = blobs.output_blob.is_some(),
                    artifacts = blobs.artifacts.len(),
                    bytes,
                    seconds = started.elapsed().as_secs_f64(),
                    "Stored the job's results in Blob Storage."
                );
            }
            report.outcome = RunOutcome::Succeeded(output);
            report.blobs = blobs;
        }
        Err(e) => report.outcome = ended(e),
    }
    drop(claim);
    report
}

/// A failed storage step as the run's end: the job's failure, or postponed.
fn ended(e: StorageError) -> RunOutcome {
    match e.job_error() {
        Some(error) => RunOutcome::Failed(error),
        None => RunOutcome::DaemonFault(DaemonFault::new(FaultStage::Storage, e.to_string())),
    }
}
