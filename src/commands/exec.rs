//! `hybrid-worker exec WORKER --input FILE`: one job through the same executor and runner the
//! daemon uses, without a broker. The worker author's inner loop.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;
use tracing::Instrument;

use super::{UsageError, ready_python, scan, workers_dir};
use crate::cli::ExecArgs;
use crate::config::Settings;
use crate::engine::executor::{ProcessExecutor, ReadyWorker};
use crate::job::{Envelope, ErrorKind, Job, JobError, JobResult, MessageProperties};
use crate::runner::{JobFiles, RunOutcome};
use crate::storage::reference::safe_file_name;
use crate::storage::results::list_outputs;

pub async fn run(settings: &Settings, args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let input = read_input(args.input.as_deref())?;
    if let Some(t) = args.timeout.filter(|t| !(t.is_finite() && *t > 0.0)) {
        return Err(UsageError(format!(
            "--timeout {t} must be a positive number of seconds"
        ))
        .into());
    }
    let dir = workers_dir(settings, &args.dir.workers_dir);
    let catalog = scan(settings, &dir)?;
    let worker = catalog.get(&args.worker)?.clone();
    let interpreter = super::Interpreters::new(settings).for_worker(&worker)?;
    let python = ready_python(&worker, &interpreter, settings, &dir)?;
    let ready = vec![ReadyWorker {
        worker: worker.clone(),
        python,
    }];
    let runner = super::runner_for(settings, &ready)?;
    let executor = ProcessExecutor::new(ready, &catalog, runner);
    let envelope = Envelope::from_properties(&MessageProperties {
        message_id: Some(format!("exec-{}", uuid::Uuid::new_v4())),
        ..Default::default()
    });
    let job = Job {
        envelope,
        worker: worker.name.clone(),
        input,
        timeout_s: args.timeout,
        input_blob: None,
    };
    let staging = LocalFiles::prepare(&settings.engine.temp_dir(), args.input_file.as_deref())?;
    let stop = crate::shutdown::on_signals()?;
    let span = tracing::info_span!("job", job_id = %job.envelope.job_id, worker = %job.worker, attempt = 1);
    let report = executor
        .execute_with_files(&job, staging.files(), stop)
        .instrument(span)
        .await;
    if matches!(report.outcome, RunOutcome::Succeeded(_)) {
        staging.deliver(args.output_dir.as_deref())?;
    }
    for (name, captured) in [("stdout", &report.stdout), ("stderr", &report.stderr)] {
        if captured.total > 0 {
            eprintln!("--- handler {name} ---\n{}", captured.text().trim_end());
        }
    }
    let millis = u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX);
    let result = match report.outcome {
        RunOutcome::Succeeded(output) => {
            JobResult::succeeded(&job.envelope, &job.worker, output, millis, report.resources)
        }
        RunOutcome::Failed(error) => JobResult::failed(
            &job.envelope,
            Some(&job.worker),
            &error,
            millis,
            report.resources,
        ),
        RunOutcome::Stopped => JobResult::failed(
            &job.envelope,
            Some(&job.worker),
            &JobError::new(ErrorKind::Crashed, "stopped by a signal before it finished"),
            millis,
            report.resources,
        ),
        // Not the job's result: the job never ran.
        RunOutcome::DaemonFault(fault) => anyhow::bail!(
            "the daemon could not start the job ({}): {fault}",
            fault.stage.as_str()
        ),
    };
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(match result.error {
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::from(super::EXIT_FAILED),
    })
}

/// The job's files when run locally: `--input-file` copied into a staging folder (the runner
/// moves what it hands the job), and the output folder kept there until it is delivered.
struct LocalFiles {
    /// Removed when dropped.
    _staging: tempfile::TempDir,
    input: Option<PathBuf>,
    outputs: PathBuf,
}

impl LocalFiles {
    fn prepare(temp_base: &Path, input_file: Option<&Path>) -> anyhow::Result<LocalFiles> {
        let staging = tempfile::Builder::new()
            .prefix("hybrid-exec-")
            .tempdir_in(temp_base)
            .map_err(|e| {
                UsageError(format!(
                    "cannot create a folder under {}: {e}",
                    temp_base.display()
                ))
            })?;
        let input = match input_file {
            None => None,
            Some(file) => {
                let name = file
                    .file_name()
                    .map(|n| safe_file_name(&n.to_string_lossy()))
                    .unwrap_or_else(|| "input".to_owned());
                let dest = staging.path().join(name);
                std::fs::copy(file, &dest).map_err(|e| {
                    UsageError(format!("cannot read --input-file {}: {e}", file.display()))
                })?;
                Some(dest)
            }
        };
        let outputs = staging.path().join("output");
        Ok(LocalFiles {
            _staging: staging,
            input,
            outputs,
        })
    }

    fn files(&self) -> JobFiles<'_> {
        JobFiles {
            input: self.input.as_deref(),
            keep_outputs: Some(&self.outputs),
            max_result_bytes: None,
        }
    }

    /// Copies the handler's output files to `dir` (or lists them when there is none), on
    /// standard error so that standard output stays the result.
    fn deliver(&self, dir: Option<&Path>) -> anyhow::Result<()> {
        let outputs = list_outputs(&self.outputs).map_err(|e| UsageError(e.message))?;
        for (name, path) in &outputs {
            match dir {
                Some(dir) => {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        UsageError(format!("cannot create --output-dir {}: {e}", dir.display()))
                    })?;
                    let dest = dir.join(name);
                    std::fs::copy(path, &dest)
                        .map_err(|e| UsageError(format!("cannot write {}: {e}", dest.display())))?;
                    eprintln!("artifact: {}", dest.display());
                }
                None => eprintln!("artifact: {name} (not kept; pass --output-dir DIR)"),
            }
        }
        Ok(())
    }
}

/// The input document: a file, standard input (`-`), or `null` when none is given.
pub fn read_input(source: Option<&str>) -> anyhow::Result<Value> {
    let (name, text) = match source {
        None => return Ok(Value::Null),
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| UsageError(format!("cannot read the input from stdin: {e}")))?;
            ("stdin".to_owned(), text)
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| UsageError(format!("cannot read --input {path}: {e}")))?;
            (path.to_owned(), text)
        }
    };
    serde_json::from_str(&text).map_err(|e| {
        UsageError(format!(
            "--input {name} is not JSON: {e} (the file holds the job's `input` value)"
        ))
        .into()
    })
}
