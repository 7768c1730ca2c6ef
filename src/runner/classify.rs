//! How a job ended, in the terms of the job contract: the runner's own kill reason, the
//! runtime's report on the channel, an OOM kill in the job's cgroup, or the exit status, in
//! that order of precedence, become a success or a classified failure.

use super::child::{self, ExitInfo};
use super::output::{Captured, ChannelEnd, Report};
use super::{KillReason, RunOutcome, RunRequest};
use crate::job::{ErrorKind, JobError};

/// Maps how the process ended to the job's outcome. The runner's own kill reason wins, then
/// the runtime's report, then an OOM kill in the job's cgroup (`oom_killed`), then the exit
/// status.
pub(super) fn classify(
    request: &RunRequest<'_>,
    killed: Option<KillReason>,
    exit: Option<ExitInfo>,
    channel: ChannelEnd,
    stderr: &Captured,
    oom_killed: bool,
) -> RunOutcome {
    let limits = request.worker.limits();
    if let Some(reason) = killed {
        return by_kill(request, reason, channel);
    }
    let detail = match channel {
        ChannelEnd::Report(report) => return by_report(report),
        ChannelEnd::TooLarge { .. } => return too_large(limits.max_result_kb),
        ChannelEnd::Garbled(why) => format!(" ({why})"),
        ChannelEnd::Nothing => String::new(),
    };
    if oom_killed {
        return fail(
            ErrorKind::MemoryLimit,
            format!(
                "the job was killed by the kernel at its cgroup memory limit of {} MiB",
                limits.memory_mb
            ),
        );
    }
    by_exit(request, exit, stderr, &detail)
}

fn fail(kind: ErrorKind, message: String) -> RunOutcome {
    RunOutcome::Failed(JobError::new(kind, message))
}

fn too_large(max_result_kb: u64) -> RunOutcome {
    fail(
        ErrorKind::ResultTooLarge,
        format!("the result is larger than the worker's limit of {max_result_kb} KiB"),
    )
}

/// The runner stopped the job: a stop, its deadline (a result complete before the deadline
/// fired still counts), or a result over the limit.
fn by_kill(request: &RunRequest<'_>, reason: KillReason, channel: ChannelEnd) -> RunOutcome {
    match reason {
        KillReason::Stopped => RunOutcome::Stopped,
        KillReason::Timeout => match channel {
            ChannelEnd::Report(Report::Output(output)) => RunOutcome::Succeeded(output),
            _ => fail(
                ErrorKind::Timeout,
                format!(
                    "the job ran past its deadline of {:.1}s and was stopped",
                    request.timeout.as_secs_f64()
                ),
            ),
        },
        KillReason::ResultTooLarge => too_large(request.worker.limits().max_result_kb),
    }
}

/// The runtime reported a result or the handler's error.
fn by_report(report: Report) -> RunOutcome {
    match report {
        Report::Output(output) => RunOutcome::Succeeded(output),
        Report::Error {
            kind,
            message,
            permanent,
        } => {
            let kind = match kind.as_str() {
                "InvalidInput" => ErrorKind::InvalidInput,
                "MemoryLimit" => ErrorKind::MemoryLimit,
                // An undeclared secret or scope (`hybrid_worker.PolicyDenied`).
                "PolicyDenied" => ErrorKind::PolicyDenied,
                _ => ErrorKind::HandlerError,
            };
            let mut error = JobError::new(kind, message);
            if permanent {
                error = error.permanent();
            }
            RunOutcome::Failed(error)
        }
    }
}

/// No report: the exit status says what happened (a CPU limit, a kill at the memory limit, a
/// `MemoryError` on the way out, or a crash).
fn by_exit(
    request: &RunRequest<'_>,
    exit: Option<ExitInfo>,
    stderr: &Captured,
    detail: &str,
) -> RunOutcome {
    let limits = request.worker.limits();
    let ran_out_of_memory = String::from_utf8_lossy(&stderr.kept).contains("MemoryError");
    match exit {
        Some(ExitInfo {
            signal: Some(sig), ..
        }) if sig == libc::SIGXCPU => fail(
            ErrorKind::Timeout,
            format!(
                "the job used its CPU limit of {}s and was stopped",
                limits.cpu_s
            ),
        ),
        Some(ExitInfo {
            signal: Some(sig),
            max_rss_kb,
            ..
        }) => {
            if sig == libc::SIGKILL && max_rss_kb >= limits.memory_mb * 1024 * 9 / 10 {
                return fail(
                    ErrorKind::MemoryLimit,
                    format!(
                        "the job was killed at its memory limit of {} MiB",
                        limits.memory_mb
                    ),
                );
            }
            fail(
                ErrorKind::Crashed,
                format!(
                    "the job's process was killed by {} without a result{detail}",
                    child::signal_name(sig)
                ),
            )
        }
        Some(ExitInfo {
            code: Some(code), ..
        }) if ran_out_of_memory => fail(
            ErrorKind::MemoryLimit,
            format!(
                "the job ran out of memory (limit {} MiB) and exited with code {code}",
                limits.memory_mb
            ),
        ),
        Some(ExitInfo {
            code: Some(code), ..
        }) => fail(
            ErrorKind::Crashed,
            format!("the job's process exited with code {code} without a result{detail}"),
        ),
        _ => fail(
            ErrorKind::Crashed,
            format!("the job's process ended in an unknown way{detail}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::worker::Worker;

    fn outcome_of(killed: Option<KillReason>, channel: ChannelEnd, oom_killed: bool) -> RunOutcome {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("w");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(
            dir.join("worker.toml"),
            "entrypoint = \"m:f\"\nmemory_mb = 64\n",
        )
        .expect("toml");
        std::fs::write(dir.join("requirements.txt"), "").expect("reqs");
        let worker = Worker::load(&dir).expect("worker");
        let input = Value::Null;
        let request = RunRequest {
            worker: &worker,
            python: PathBuf::from("/venv/bin/python"),
            job_id: "j",
            attempt: 1,
            correlation_id: None,
            input: &input,
            timeout: Duration::from_secs(1),
            extra_env: Vec::new(),
        };
        // SIGKILL well under the memory limit: without the cgroup's word, a crash.
        let exit = ExitInfo {
            code: None,
            signal: Some(libc::SIGKILL),
            cpu_ms: 5,
            max_rss_kb: 1024,
        };
        classify(
            &request,
            killed,
            Some(exit),
            channel,
            &Captured::default(),
            oom_killed,
        )
    }

    fn kind(outcome: RunOutcome) -> ErrorKind {
        match outcome {
            RunOutcome::Failed(e) => e.kind,
            other => panic!("not a failure: {other:?}"),
        }
    }

    #[test]
    fn an_oom_kill_in_the_job_cgroup_is_memory_limit_not_a_crash() {
        let oom = outcome_of(None, ChannelEnd::Nothing, true);
        match &oom {
            RunOutcome::Failed(e) => assert!(
                e.kind == ErrorKind::MemoryLimit
                    && e.message.contains("cgroup memory limit of 64 MiB"),
                "{e:?}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            kind(outcome_of(None, ChannelEnd::Nothing, false)),
            ErrorKind::Crashed
        );
        // A result reported before the kill, and the runner's own deadline, still come first.
        assert_eq!(
            outcome_of(
                None,
                ChannelEnd::Report(Report::Output(serde_json::json!(1))),
                true
            ),
            RunOutcome::Succeeded(serde_json::json!(1))
        );
        assert_eq!(
            kind(outcome_of(
                Some(KillReason::Timeout),
                ChannelEnd::Nothing,
                true
            )),
            ErrorKind::Timeout
        );
    }
}
