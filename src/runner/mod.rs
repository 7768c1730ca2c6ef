//! Running one job: one OS process in its own group, a clean environment, a private temp
//! folder, a deadline, capped output, and an explicit reason whenever the runner kills it.
//!
//! The runner knows nothing of brokers. It takes a worker, its venv interpreter and the job's
//! input, and returns a [`RunReport`]: the outcome (output, a classified failure, or "stopped"
//! when the caller asked it to stop), what the process cost, and its captured output.
//!
//! Where the daemon has job cgroups ([`crate::sandbox::cgroup`]), each job gets one before its
//! process starts; when the process ends, whatever is left in it is killed, its memory events
//! say whether the OOM killer ended the job, and it is removed.

pub mod child;
mod classify;
mod env;
pub mod files;
mod governed;
pub mod output;
pub mod reaper;
mod supervise;
pub mod warm;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::egress::{Egress, EgressSandbox, JobPass};
use crate::job::{ErrorKind, JobError, Resources};
use crate::python_runtime::{Runtime, STUB};
use crate::sandbox::cgroup::{CgroupError, CgroupUsage, JobCgroup};
use crate::sandbox::{Enforced, Sandbox, SandboxSettings};
use crate::secrets::Governance;
use crate::telemetry::metrics::metrics;
use crate::worker::{Isolation, NetworkPolicy, Worker};
use child::{ChildHandle, ChildPipes, ChildSpec, ExitInfo};
pub use files::JobFiles;
use files::{OUTPUT_DIR, TakeError, hand_input, take_outputs};
use governed::JobGovernance;
use output::{Captured, LogRecord};

/// How long a job has between SIGTERM and SIGKILL when the runner stops it.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for output pipes after the process group is dead (a stray that escaped
/// the group could hold them open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Why the runner ended a job itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// The deadline passed.
    Timeout,
    /// The result exceeded the worker's limit; reading stopped and the job was ended.
    ResultTooLarge,
    /// The caller asked (lock lost, shutdown): the job has no outcome of its own.
    Stopped,
}

/// One job, as the runner needs it.
#[derive(Debug, Clone)]
pub struct RunRequest<'a> {
    pub worker: &'a Worker,
    /// The worker venv's `bin/python`, checked by the caller.
    pub python: PathBuf,
    pub job_id: &'a str,
    pub attempt: u32,
    pub correlation_id: Option<&'a str>,
    pub input: &'a Value,
    /// Already capped by the worker's limit.
    pub timeout: Duration,
    /// Extra variables for the job, such as `TRACEPARENT`.
    pub extra_env: Vec<(String, String)>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    Succeeded(Value),
    Failed(JobError),
    /// Stopped at the caller's request; the job must not be settled as a result.
    Stopped,
    /// The daemon failed the job through its own fault (its cgroup, temp folder, sandbox,
    /// process or warm parent, or the claim-check storage): the job is not to blame. It is run
    /// again, and no attempt is counted.
    DaemonFault(DaemonFault),
}

/// A root daemon never runs a job as root: when the job user cannot reach what the job needs,
/// the job is not started (the daemon refuses to start in that state; this guards the rest).
fn refuse_root(policy: &crate::sandbox::SandboxPolicy) -> Result<(), DaemonFault> {
    match policy.would_stay_root() {
        Some(why) => Err(DaemonFault::new(FaultStage::Sandbox, why)),
        None => Ok(()),
    }
}

/// Where the daemon failed to start a job; the label of `hybrid_daemon_faults_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultStage {
    /// Making or opening the job's cgroup.
    Cgroup,
    /// Making the job's private temp folder.
    TempFolder,
    /// Preparing the sandbox (seccomp program, Landlock ruleset, the folder's owner).
    Sandbox,
    /// Starting the job's process (fork, exec, descriptors, the process limit).
    Start,
    /// The warm parent of a fork-mode worker could not be started or could not fork.
    WarmParent,
    /// The claim-check Blob Storage could not be reached, or refused the daemon: the input
    /// could not be fetched or the results not stored.
    Storage,
}

impl FaultStage {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultStage::Cgroup => "cgroup",
            FaultStage::TempFolder => "temp_folder",
            FaultStage::Sandbox => "sandbox",
            FaultStage::Start => "start",
            FaultStage::WarmParent => "warm_parent",
            FaultStage::Storage => "storage",
        }
    }
}

/// A fault of the daemon that kept a job from starting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DaemonFault {
    pub stage: FaultStage,
    pub message: String,
}

impl DaemonFault {
    pub fn new(stage: FaultStage, message: impl Into<String>) -> Self {
        Self {
            stage,
            message: message.into(),
        }
    }
}

/// Everything the runner learned about one run.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: RunOutcome,
    pub duration: Duration,
    pub resources: Resources,
    pub stdout: Captured,
    pub stderr: Captured,
    pub killed: Option<KillReason>,
    pub exit: Option<ExitInfo>,
    /// Log records over the worker's output budget, counted rather than forwarded.
    pub dropped_logs: u64,
    /// What the job's cgroup recorded (OOM kills, peak memory); `None` without job cgroups.
    pub cgroup: Option<CgroupUsage>,
    /// Why the job's output folder could not be kept ([`JobFiles::keep_outputs`]), when the
    /// fault is the daemon's.
    pub outputs_error: Option<String>,
    /// What the caller stored for the job in Blob Storage (filled by the executor).
    pub blobs: crate::storage::ResultBlobs,
}

impl RunReport {
    /// The report of a job that never got a process.
    pub fn failed_to_start(error: JobError) -> Self {
        Self::without_process(RunOutcome::Failed(error))
    }

    /// The report of a job the daemon could not start.
    pub fn daemon_fault(fault: DaemonFault) -> Self {
        Self::without_process(RunOutcome::DaemonFault(fault))
    }

    /// The report of a run that ended with `outcome` before (or without) a process.
    pub fn without_process(outcome: RunOutcome) -> Self {
        Self {
            outcome,
            duration: Duration::ZERO,
            resources: Resources::default(),
            stdout: Captured::default(),
            stderr: Captured::default(),
            killed: None,
            exit: None,
            dropped_logs: 0,
            cgroup: None,
            outputs_error: None,
            blobs: Default::default(),
        }
    }
}

/// Starts job processes from one installed runtime, under one temp folder, each in its
/// sandbox: spawned, or forked from the worker's warm parent ([`warm`]).
#[derive(Debug, Clone)]
pub struct Runner {
    runtime: Runtime,
    temp_base: PathBuf,
    sandbox: Sandbox,
    /// The warm parents of fork-mode workers, shared by the runner's clones.
    warm: Arc<warm::WarmPool>,
    /// The secrets folder and the token source of jobs (docs/secrets.md).
    governance: Governance,
    /// The egress proxies of workers with a `network` list, shared with the warm parents.
    egress: Arc<Egress>,
}

/// A started job's process, whichever way it was started.
enum JobProcess {
    Spawned(ChildHandle),
    Forked(warm::ForkedJob),
}

impl JobProcess {
    fn signal_group(&self, signal: Signal) {
        match self {
            JobProcess::Spawned(handle) => handle.signal_group(signal),
            JobProcess::Forked(job) => job.signal_group(signal),
        }
    }
}

/// How the job's process ended, when the runner learns it: `None` when that is unknown (its
/// warm parent died with it).
type ExitFuture = Pin<Box<dyn Future<Output = Option<ExitInfo>> + Send>>;

/// A job whose process has started, either way.
struct Started {
    process: JobProcess,
    pipes: ChildPipes,
    workdir: tempfile::TempDir,
    exit: ExitFuture,
}

impl Runner {
    /// A runner with the full sandbox and default settings (job cgroups `auto`).
    pub fn new(runtime: Runtime, temp_base: PathBuf) -> Result<Self, CgroupError> {
        Ok(Self::with_sandbox(
            runtime,
            temp_base,
            Sandbox::new(SandboxSettings::default())?,
        ))
    }

    /// A runner with the given sandbox (the configured settings, or fewer mechanisms for the
    /// benchmark).
    pub fn with_sandbox(runtime: Runtime, temp_base: PathBuf, sandbox: Sandbox) -> Self {
        // Orphans of jobs come to this process rather than to PID 1, whose reaping may be slow
        // or absent, and are reaped here.
        if let Err(why) = reaper::install() {
            tracing::warn!(reason = %why, "This process cannot be a child subreaper; orphans of jobs go to PID 1.");
        }
        let egress = Arc::new(Egress::new(sandbox.mechanisms.netns));
        let warm = Arc::new(warm::WarmPool::new(
            runtime.dir.clone(),
            temp_base.clone(),
            sandbox.clone(),
            egress.clone(),
        ));
        Self {
            runtime,
            temp_base,
            sandbox,
            warm,
            governance: Governance::default(),
            egress,
        }
    }

    /// This runner, handing jobs their secrets from `governance.secrets_dir` and tokens from
    /// `governance.tokens`.
    pub fn with_governance(mut self, governance: Governance) -> Self {
        self.governance = governance;
        self
    }

    /// The secrets folder and token source jobs are served from.
    pub fn governance(&self) -> &Governance {
        &self.governance
    }

    /// The warm parents of fork-mode workers.
    pub fn warm_pool(&self) -> &warm::WarmPool {
        &self.warm
    }

    /// Starts the warm parent of `worker` now when it runs in fork mode, so that its first job
    /// does not wait for the imports; a failure is logged and retried at the first job.
    pub async fn warm_up(&self, worker: &Worker, python: &Path) {
        if worker.isolation() == Isolation::Fork
            && let Err(e) = self.warm.warm_up(worker, python).await
        {
            tracing::warn!(worker = %worker.name, error = %e, "Could not start the warm parent; the first job will try again.");
        }
    }

    /// The sandbox of `worker`'s jobs (what they may read, whom they run as).
    pub fn policy(&self, worker: &Worker, python: &Path) -> crate::sandbox::SandboxPolicy {
        self.sandbox
            .policy(worker, python, &self.runtime.dir, &self.temp_base)
    }

    /// What the sandbox enforces for `worker`'s jobs on this kernel, for start-up reports.
    pub fn enforcement(&self, worker: &Worker, python: &Path) -> Vec<Enforced> {
        self.sandbox
            .policy(worker, python, &self.runtime.dir, &self.temp_base)
            .enforcement()
    }

    /// The folder jobs' private folders are made in (the daemon's staging folders go there
    /// too, so that files move between them by renaming).
    pub fn temp_base(&self) -> &Path {
        &self.temp_base
    }

    /// Runs one job to its end. `stop` ends it early with [`RunOutcome::Stopped`]; `on_log`
    /// receives the handler's log records as they come.
    pub async fn run(
        &self,
        request: RunRequest<'_>,
        stop: CancellationToken,
        on_log: &(dyn Fn(LogRecord) + Send + Sync),
    ) -> RunReport {
        self.run_with_files(request, JobFiles::default(), stop, on_log)
            .await
    }

    /// [`Runner::run`] with files: an input handed to the job, its output folder kept.
    pub async fn run_with_files(
        &self,
        request: RunRequest<'_>,
        files: JobFiles<'_>,
        stop: CancellationToken,
        on_log: &(dyn Fn(LogRecord) + Send + Sync),
    ) -> RunReport {
        let started = tokio::time::Instant::now();
        let failed = |fault: DaemonFault| RunReport {
            duration: started.elapsed(),
            ..RunReport::daemon_fault(fault)
        };
        let limits = request.worker.limits();
        // Read at each job's start: a rotated secret is the next job's.
        let mut governed = match JobGovernance::prepare(&self.governance, &request) {
            Ok(governed) => governed,
            Err(denied) => {
                return RunReport {
                    duration: started.elapsed(),
                    ..RunReport::failed_to_start(denied)
                };
            }
        };
        // For a worker with an egress list: its proxy, and this job's pass to it, held until
        // the job has ended (its connections close then).
        let egress = match self.egress_pass(&request) {
            Ok(egress) => egress,
            Err(fault) => return failed(fault),
        };
        if let Some((_, pass)) = &egress {
            governed.also_scrub("egress-proxy", pass.credential());
        }
        let (cgroup, started_job) = match self.start(&request, egress.as_ref()).await {
            Ok(pair) => pair,
            Err(fault) => return failed(fault),
        };
        let Started {
            process,
            pipes,
            workdir,
            exit,
        } = started_job;
        // The process waits for its job document; its input file is in place before.
        let input_path = match files
            .input
            .map(|f| hand_input(workdir.path(), f))
            .transpose()
        {
            Ok(path) => path,
            Err(message) => {
                let started_job = Started {
                    process,
                    pipes,
                    workdir,
                    exit,
                };
                abandon(started_job, cgroup).await;
                return failed(DaemonFault::new(FaultStage::TempFolder, message));
            }
        };
        let job_bytes = job_document(&request, input_path, workdir.path(), &mut governed);
        let output_cap = usize::try_from(limits.max_output_kb * 1024).unwrap_or(usize::MAX);
        let result_limit = files
            .max_result_bytes
            .unwrap_or(limits.max_result_kb * 1024);
        // The result line carries JSON framing around the output: allow for it.
        let line_limit = usize::try_from(result_limit).unwrap_or(usize::MAX) + 64;

        let (asks, token_service) = governed.token_channel();
        let write_job = crate::secrets::tokens::serve(pipes.job, job_bytes, token_service);
        let governed = &governed;
        let on_scrubbed_log = |record: LogRecord| on_log(governed.log(record));
        let io = async {
            tokio::join!(
                write_job,
                output::capture(pipes.stdout, output_cap),
                output::capture(pipes.stderr, output_cap),
                output::read_channel(
                    pipes.channel,
                    line_limit,
                    output_cap,
                    asks,
                    &on_scrubbed_log,
                ),
            )
        };
        let watched =
            supervise::watch(&process, cgroup.as_ref(), exit, io, request.timeout, &stop).await;
        drop(process);
        drop(egress);
        let kept = files
            .keep_outputs
            .map(|dest| take_outputs(workdir.path(), dest));
        if let Err(e) = workdir.close() {
            tracing::warn!(error = %e, "Could not remove a job's temp folder.");
        }
        let usage = match cgroup {
            Some(cgroup) => Some(cgroup.finish().await),
            None => None,
        };
        let mut report = report(&request, governed, watched, usage);
        report.duration = started.elapsed();
        if let Some(Err(e)) = kept {
            outputs_not_kept(&mut report, e);
        }
        report
    }

    /// Starts the job's process the worker's way, in its cgroup (made before the process,
    /// which enters it before it runs anything; in fork mode the warm parent's spare child
    /// entered it ahead, and the job takes it over).
    async fn start(
        &self,
        request: &RunRequest<'_>,
        egress: Option<&(EgressSandbox, JobPass)>,
    ) -> Result<(Option<JobCgroup>, Started), DaemonFault> {
        let proxy_env = egress
            .map(|(_, pass)| pass.environment())
            .unwrap_or_default();
        match request.worker.isolation() {
            Isolation::Spawn => {
                let cgroup = self
                    .sandbox
                    .job_cgroup(request.worker.limits())
                    .map_err(|e| DaemonFault::new(FaultStage::Cgroup, e.to_string()))?;
                let sandbox = egress.map(|(sandbox, _)| sandbox.clone());
                let started = self.spawn(request, cgroup.as_ref(), sandbox, &proxy_env)?;
                Ok((cgroup, started))
            }
            Isolation::Fork => {
                let (started, cgroup) = self.fork(request, &proxy_env).await?;
                Ok((cgroup, started))
            }
        }
    }

    /// The worker's egress proxy (started at its first job) and this job's pass to it, when
    /// the worker has a `network` list.
    fn egress_pass(
        &self,
        request: &RunRequest<'_>,
    ) -> Result<Option<(EgressSandbox, JobPass)>, DaemonFault> {
        let NetworkPolicy::List(rules) = &request.worker.limits().network else {
            return Ok(None);
        };
        let gateway = self
            .egress
            .gateway(&request.worker.name)
            .map_err(|e| DaemonFault::new(FaultStage::Sandbox, e.to_string()))?;
        Ok(Some((
            gateway.sandbox(),
            gateway.register(request.job_id, rules),
        )))
    }

    /// Spawn mode: a fresh interpreter, sandboxed between fork and exec (where it enters
    /// `cgroup` first, then the egress proxy's namespace when the worker has one).
    fn spawn(
        &self,
        request: &RunRequest<'_>,
        cgroup: Option<&JobCgroup>,
        egress: Option<EgressSandbox>,
        proxy_env: &[(String, String)],
    ) -> Result<Started, DaemonFault> {
        let workdir = tempfile::Builder::new()
            .prefix("hybrid-job-")
            .tempdir_in(&self.temp_base)
            .map_err(|e| {
                DaemonFault::new(
                    FaultStage::TempFolder,
                    format!(
                        "cannot create the job's temp folder under {}: {e}",
                        self.temp_base.display()
                    ),
                )
            })?;
        let spec = self.child_spec(request, workdir.path(), proxy_env);
        // `uid` is held until the process is reaped: the uid is the job's alone while it runs.
        let (mut policy, uid) = self.sandbox.policy_for_job(
            request.worker,
            &request.python,
            &self.runtime.dir,
            &self.temp_base,
        );
        policy.egress = egress;
        refuse_root(&policy)?;
        let mut prepared = policy.prepare(workdir.path()).map_err(|e| {
            DaemonFault::new(
                FaultStage::Sandbox,
                format!("cannot prepare the job's sandbox: {e}"),
            )
        })?;
        let spawning = std::time::Instant::now();
        let cannot_start = |e: std::io::Error| {
            DaemonFault::new(
                FaultStage::Start,
                format!("cannot start {}: {e}", spec.program.display()),
            )
        };
        // With a job cgroup, the child starts inside it (no move, whose cost is an RCU grace
        // period); where the kernel cannot, it enters it between fork and exec.
        let started = match cgroup {
            Some(cgroup) => {
                let dir = std::fs::File::open(cgroup.dir()).map_err(|e| {
                    DaemonFault::new(
                        FaultStage::Cgroup,
                        format!(
                            "cannot open the job's cgroup {}: {e}",
                            cgroup.dir().display()
                        ),
                    )
                })?;
                match child::spawn_in_cgroup(&spec, &prepared, std::os::fd::AsFd::as_fd(&dir))
                    .map_err(cannot_start)?
                {
                    Some(started) => started,
                    None => {
                        prepared.enter_cgroup(cgroup.procs()).map_err(|e| {
                            DaemonFault::new(
                                FaultStage::Cgroup,
                                format!("cannot hand the job its cgroup: {e}"),
                            )
                        })?;
                        child::spawn(&spec, prepared).map_err(cannot_start)?
                    }
                }
            }
            None => child::spawn(&spec, prepared).map_err(cannot_start)?,
        };
        let (handle, pipes) = started;
        metrics().observe_process_start("spawn", spawning.elapsed());
        let waiter = handle.clone();
        let exit: ExitFuture = Box::pin(async move {
            let waited = tokio::task::spawn_blocking(move || {
                let exit = waiter.wait_blocking();
                // Helpers the job left behind were handed to this subreaper: they die and are
                // reaped now, before the next job of this uid needs the process count.
                reaper::end_job_group(waiter.pid());
                exit
            })
            .await;
            drop(uid);
            waited.ok().and_then(Result::ok)
        });
        Ok(Started {
            process: JobProcess::Spawned(handle),
            pipes,
            workdir,
            exit,
        })
    }

    /// Fork mode: a child of the worker's warm parent ([`warm`]), with the cgroup it entered.
    async fn fork(
        &self,
        request: &RunRequest<'_>,
        proxy_env: &[(String, String)],
    ) -> Result<(Started, Option<JobCgroup>), DaemonFault> {
        let env = |workdir: &Path| self.child_spec(request, workdir, proxy_env).env;
        let forking = std::time::Instant::now();
        let (job, pipes, workdir, exited, cgroup) = self
            .warm
            .fork_job(request.worker, &request.python, &env)
            .await
            .map_err(|e| {
                DaemonFault::new(FaultStage::WarmParent, format!("cannot start the job: {e}"))
            })?;
        metrics().observe_process_start("fork", forking.elapsed());
        // A dropped sender means the warm parent died: how the job ended is unknown.
        let exit: ExitFuture = Box::pin(async move { exited.await.ok() });
        Ok((
            Started {
                process: JobProcess::Forked(job),
                pipes,
                workdir,
                exit,
            },
            cgroup,
        ))
    }

    /// The job's process: `proxy_env` points its HTTP clients at its worker's egress proxy.
    fn child_spec(
        &self,
        request: &RunRequest<'_>,
        workdir: &Path,
        proxy_env: &[(String, String)],
    ) -> ChildSpec {
        let ids = [
            ("HYBRID_JOB_ID".to_owned(), request.job_id.to_owned()),
            ("HYBRID_ATTEMPT".to_owned(), request.attempt.to_string()),
        ];
        let job_env = ids
            .into_iter()
            .chain(request.extra_env.iter().cloned())
            .chain(proxy_env.iter().cloned());
        ChildSpec {
            program: request.python.clone(),
            args: env::arguments(STUB, &self.runtime.dir, request.worker),
            env: env::environment(request.worker, &request.python, workdir, job_env),
            cwd: workdir.to_path_buf(),
        }
    }
}

/// Ends a started job before it was handed its document: killed, reaped, its folder and
/// cgroup removed.
async fn abandon(started: Started, cgroup: Option<JobCgroup>) {
    supervise::kill_all(&started.process, cgroup.as_ref());
    let _ = started.exit.await;
    drop((started.pipes, started.process));
    let _ = started.workdir.close();
    if let Some(cgroup) = cgroup {
        cgroup.finish().await;
    }
}

/// The job's output folder could not be kept: a succeeded job whose `ctx.output_dir` was
/// replaced fails (its outputs are gone); a move that failed is the daemon's, reported beside
/// the outcome.
fn outputs_not_kept(report: &mut RunReport, error: TakeError) {
    match error {
        TakeError::NotAFolder if matches!(report.outcome, RunOutcome::Succeeded(_)) => {
            report.outcome = RunOutcome::Failed(
                JobError::new(
                    ErrorKind::HandlerError,
                    "ctx.output_dir was replaced by something that is not a folder",
                )
                .permanent(),
            );
        }
        TakeError::Move(e) => report.outputs_error = Some(e),
        TakeError::NotAFolder => {}
    }
}

/// The job document: one line, written to the job's input pipe (which stays open after it
/// for a job that may ask for tokens); the governed fields (its secrets) join it here.
fn job_document(
    request: &RunRequest<'_>,
    input_path: Option<PathBuf>,
    workdir: &Path,
    governed: &mut JobGovernance,
) -> Vec<u8> {
    let deadline = SystemTime::now() + request.timeout;
    let mut job_doc = json!({
        "job_id": request.job_id,
        "attempt": request.attempt,
        "deadline": deadline.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
        "correlation_id": request.correlation_id,
        "worker": request.worker.name,
        "input": request.input,
        "input_path": input_path,
        "output_dir": workdir.join(OUTPUT_DIR),
    });
    if let Value::Object(doc) = &mut job_doc {
        doc.append(&mut governed.fields);
    }
    serde_json::to_vec(&job_doc).unwrap_or_default()
}

/// The report of a job whose process ran: its outcome classified (and scrubbed of its
/// secrets), with what it cost and printed.
fn report(
    request: &RunRequest<'_>,
    governed: &JobGovernance,
    watched: supervise::Watched,
    usage: Option<CgroupUsage>,
) -> RunReport {
    let stdout = governed.captured(watched.stdout);
    let stderr = governed.captured(watched.stderr);
    let resources = watched
        .exit
        .map(|e| Resources {
            cpu_ms: e.cpu_ms,
            max_rss_kb: e.max_rss_kb,
        })
        .unwrap_or_default();
    let oom_killed = usage.as_ref().is_some_and(|u| u.oom_killed());
    let outcome = governed.outcome(classify::classify(
        request,
        watched.killed,
        watched.exit,
        watched.channel,
        &stderr,
        oom_killed,
    ));
    RunReport {
        outcome,
        duration: Duration::ZERO,
        resources,
        stdout,
        stderr,
        killed: watched.killed,
        exit: watched.exit,
        dropped_logs: watched.dropped_logs,
        cgroup: usage,
        outputs_error: None,
        blobs: Default::default(),
    }
}
