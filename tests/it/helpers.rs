//! The shared harness: an engine over the in-memory broker (with a scripted or a real
//! executor), worker venvs built once per test run, and small builders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use hybrid_worker::broker::OutgoingMessage;
use hybrid_worker::broker::memory::MemoryBroker;
use hybrid_worker::engine::executor::{Executor, ProcessExecutor, ReadyWorker, WorkerPolicy};
use hybrid_worker::engine::settle::Queues;
use hybrid_worker::engine::{Engine, EngineOptions, EngineStats};
use hybrid_worker::job::{ErrorKind, Job, JobError};
use hybrid_worker::python_runtime::Runtime;
use hybrid_worker::runner::{DaemonFault, FaultStage, RunOutcome, RunReport, Runner};
use hybrid_worker::worker::python::Interpreter;
use hybrid_worker::worker::venv::{VenvPlan, VenvState};
use hybrid_worker::worker::{Catalog, Isolation, RetryPolicy};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const JOBS: &str = "jobs";
pub const RESULTS: &str = "results";

pub fn options(concurrency: usize) -> EngineOptions {
    EngineOptions {
        concurrency,
        queues: Queues {
            jobs: JOBS.into(),
            results: RESULTS.into(),
            reply_allowed: Vec::new(),
        },
        drain_timeout: Duration::from_secs(30),
        max_lock_renewal: Duration::from_secs(3600),
        max_body_bytes: 64 * 1024,
        receive_wait: Duration::from_secs(5),
    }
}

/// A job message as a flow sends it.
pub fn job_message(id: &str, body: &Value) -> OutgoingMessage {
    OutgoingMessage {
        message_id: Some(id.into()),
        correlation_id: Some(format!("flow-run-{id}")),
        reply_to_session_id: Some(format!("session-{id}")),
        content_type: Some("application/json".into()),
        body: serde_json::to_vec(body).expect("json"),
        ..Default::default()
    }
}

/// A running engine and the means to stop it.
pub struct Running {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<EngineStats>,
}

impl Running {
    pub async fn stop(self) -> EngineStats {
        self.shutdown.cancel();
        self.task.await.expect("engine task")
    }
}

pub fn start(
    broker: Arc<MemoryBroker>,
    executor: Arc<dyn Executor>,
    options: EngineOptions,
) -> Running {
    let engine = Engine::new(broker, executor, options);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move { engine.run(token).await });
    Running { shutdown, task }
}

/// Waits (on the test's clock) until `done` holds; fails after `limit`.
pub async fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let give_up = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An executor whose jobs do what their input says, on tokio's clock:
/// `{"ms": run time, "result": "ok" | "fail" | "invalid" | "crash", "ok_from_attempt": n,
/// "daemon_faults": n}` (the first n runs of the job fail to start through the daemon's fault).
#[derive(Default)]
pub struct ScriptedExecutor {
    pub started: Mutex<Vec<(String, u32)>>,
    pub stopped: AtomicUsize,
}

impl ScriptedExecutor {
    pub fn started(&self) -> Vec<(String, u32)> {
        self.started.lock().expect("lock").clone()
    }
}

pub fn scripted_policy() -> WorkerPolicy {
    WorkerPolicy {
        max_attempts: 3,
        retry: RetryPolicy {
            initial_delay_s: 10.0,
            max_delay_s: 600.0,
        },
    }
}

#[async_trait]
impl Executor for ScriptedExecutor {
    fn policy(&self, job: &Job) -> Result<WorkerPolicy, JobError> {
        match job.worker.as_str() {
            "scripted" => Ok(scripted_policy()),
            "denied" => Err(JobError::new(ErrorKind::PolicyDenied, "not allowed here")),
            other => Err(JobError::new(
                ErrorKind::UnknownWorker,
                format!("no worker {other:?}"),
            )),
        }
    }

    async fn execute(&self, job: &Job, stop: CancellationToken) -> RunReport {
        let runs = {
            let mut started = self.started.lock().expect("lock");
            started.push((job.envelope.job_id.clone(), job.envelope.attempt));
            started
                .iter()
                .filter(|(id, _)| *id == job.envelope.job_id)
                .count() as u64
        };
        if runs <= job.input["daemon_faults"].as_u64().unwrap_or(0) {
            return RunReport::daemon_fault(DaemonFault {
                stage: FaultStage::Start,
                message: "cannot start the job: Too many open files (os error 24)".into(),
            });
        }
        let ms = job.input["ms"].as_u64().unwrap_or(10);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => {}
            () = stop.cancelled() => {
                self.stopped.fetch_add(1, Ordering::SeqCst);
                let mut report = RunReport::failed_to_start(JobError::new(ErrorKind::Crashed, "x"));
                report.outcome = RunOutcome::Stopped;
                return report;
            }
        }
        let ok_from = job.input["ok_from_attempt"].as_u64().unwrap_or(u64::MAX);
        let result = if u64::from(job.envelope.attempt) >= ok_from {
            "ok"
        } else {
            job.input["result"].as_str().unwrap_or("ok")
        };
        let mut report = RunReport::failed_to_start(JobError::new(ErrorKind::Crashed, "crashed"));
        report.duration = Duration::from_millis(ms);
        report.outcome = match result {
            "ok" => RunOutcome::Succeeded(json!({"done": job.envelope.job_id})),
            "fail" => RunOutcome::Failed(JobError::new(
                ErrorKind::HandlerError,
                "boom with secret payload",
            )),
            "invalid" => {
                RunOutcome::Failed(JobError::new(ErrorKind::InvalidInput, "field x is wrong"))
            }
            _ => report.outcome,
        };
        report
    }
}

/// The repository's `workers/` folder.
pub fn workers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workers")
}

/// Where this test run keeps worker venvs (built once, reused across runs).
pub fn venv_root() -> PathBuf {
    std::env::var_os("HYBRID_TEST_VENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venvs"))
}

/// Where a root test run keeps copies of what jobs must read (the daemon's
/// `workers.system_dir`).
pub fn system_dir() -> PathBuf {
    std::env::var_os("HYBRID_TEST_SYSTEM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/hybrid-worker"))
}

/// The interpreter, resolved once, as the daemon resolves it: run as root, a copy that the job
/// user (65534) can reach when it cannot reach `python3` itself.
pub fn interpreter() -> &'static Interpreter {
    static PYTHON: OnceLock<Interpreter> = OnceLock::new();
    PYTHON.get_or_init(|| {
        Interpreter::resolve("python3")
            .expect("python3 is needed by the tests")
            .for_jobs(65534, 65534, &system_dir())
            .expect("a copy of python3 that jobs can read")
    })
}

/// The venv python of a repository worker, building the venv on first use (from PyPI, hash
/// checked). Serialised so that parallel tests never build the same venv twice.
pub fn ready_worker(name: &str) -> ReadyWorker {
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let catalog = Catalog::scan(&workers_dir()).expect("workers folder");
    let worker = catalog
        .get(name)
        .expect("worker")
        .clone()
        .for_jobs(65534, 65534, &system_dir())
        .expect("a copy of the worker that jobs can read");
    let plan = VenvPlan::new(&worker, interpreter(), &venv_root()).expect("plan");
    if !plan.state().is_ready() {
        plan.build(interpreter(), &|_| {}).expect("venv build");
    }
    let VenvState::Ready { python, .. } = plan.state() else {
        panic!("venv of {name} not ready after build");
    };
    ReadyWorker { worker, python }
}

/// A runner with the runtime installed in a temp folder of the test.
pub fn runner(temp: &Path) -> Runner {
    // A test's temp folder is private (0700); the job user must enter it to reach its own.
    std::fs::set_permissions(temp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the test's temp folder");
    let runtime = Runtime::install(temp).expect("runtime");
    Runner::new(runtime, temp.to_path_buf()).expect("job cgroups `auto` never fail")
}

/// An executor of real processes for the given repository workers, their jobs started in
/// `mode`.
pub fn process_executor_in(names: &[&str], temp: &Path, mode: Isolation) -> ProcessExecutor {
    let catalog = Catalog::scan(&workers_dir()).expect("workers folder");
    let ready = names
        .iter()
        .map(|n| in_mode(ready_worker(n), mode))
        .collect();
    ProcessExecutor::new(ready, &catalog, runner(temp))
}

/// The reply bodies sent to a queue, by CorrelationId.
pub fn replies(broker: &MemoryBroker, queue: &str) -> BTreeMap<String, (OutgoingMessage, Value)> {
    broker
        .messages(queue)
        .into_iter()
        .map(|m| {
            let body: Value = serde_json::from_slice(&m.message.body).expect("reply is JSON");
            (
                m.message.correlation_id.clone().unwrap_or_default(),
                (m.message, body),
            )
        })
        .collect()
}

/// The interpreter the hostile-worker tests build venvs from: one that an unprivileged user can
/// reach, so that a root test run drops jobs to `nobody` as a root daemon would
/// (`HYBRID_TEST_SANDBOX_PYTHON`, else the system's `/usr/bin/python3`, else `python3`).
pub fn sandbox_interpreter() -> &'static Interpreter {
    static PYTHON: OnceLock<Interpreter> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let command = std::env::var("HYBRID_TEST_SANDBOX_PYTHON").unwrap_or_else(|_| {
            if Path::new("/usr/bin/python3").exists() {
                "/usr/bin/python3".into()
            } else {
                "python3".into()
            }
        });
        Interpreter::resolve(&command).expect("a Python for the sandbox tests")
    })
}

/// A world-searchable copy of the hostile-worker fixtures and their venvs under the system temp
/// folder (the checkout may sit in a folder `nobody` cannot enter). One folder per user and
/// checkout, reused across runs like `target/test-venvs`; the fixtures are copied afresh.
pub fn hostile_home() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        use sha2::Digest;
        let checkout = hex::encode(sha2::Sha256::digest(env!("CARGO_MANIFEST_DIR").as_bytes()));
        let uid = nix::unistd::getuid();
        let home =
            std::env::temp_dir().join(format!("hybrid-worker-hostile-{uid}-{}", &checkout[..12]));
        std::fs::create_dir_all(&home).expect("mkdir");
        open_to_all(&home);
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile-workers");
        let workers = home.join("workers");
        copy_tree(&source, &workers);
        home
    })
}

fn open_to_all(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    open_to_all(to);
    for entry in std::fs::read_dir(from).expect("read fixtures") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A hostile-worker fixture with its venv built (from [`sandbox_interpreter`]).
pub fn hostile_worker(name: &str) -> ReadyWorker {
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let catalog = Catalog::scan(&hostile_home().join("workers")).expect("fixtures folder");
    assert!(catalog.broken.is_empty(), "{:?}", catalog.broken);
    let worker = catalog.get(name).expect("fixture worker").clone();
    let plan = VenvPlan::new(
        &worker,
        sandbox_interpreter(),
        &hostile_home().join("venvs"),
    )
    .expect("plan");
    if !plan.state().is_ready() {
        plan.build(sandbox_interpreter(), &|_| {})
            .expect("venv build");
    }
    let VenvState::Ready { python, .. } = plan.state() else {
        panic!("venv of {name} not ready after build");
    };
    ReadyWorker { worker, python }
}

/// A runner with the given `[sandbox]` settings, whose temp folder an unprivileged job user can
/// enter.
pub fn sandboxed_runner_with(
    temp: &Path,
    settings: hybrid_worker::sandbox::SandboxSettings,
) -> Runner {
    sandboxed_runner_in(
        temp,
        hybrid_worker::sandbox::Sandbox::new(settings).expect("the sandbox settings"),
    )
}

/// A runner with the given sandbox (fewer mechanisms, say), whose temp folder an unprivileged
/// job user can enter.
pub fn sandboxed_runner_in(temp: &Path, sandbox: hybrid_worker::sandbox::Sandbox) -> Runner {
    open_to_all(temp);
    let runtime = Runtime::install(temp).expect("runtime");
    Runner::with_sandbox(runtime, temp.to_path_buf(), sandbox)
}

/// `ready` with its jobs started in `mode`, whatever its `worker.toml` says: the runner and
/// hostile suites run every case in both modes.
pub fn in_mode(mut ready: ReadyWorker, mode: Isolation) -> ReadyWorker {
    ready.worker.spec.isolation = mode;
    ready
}

/// Defines, for each named `async fn name(mode: Isolation)`, the tests `name::spawn` and
/// `name::fork`.
#[macro_export]
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn spawn() {
                    super::$name(hybrid_worker::worker::Isolation::Spawn).await
                }
                #[tokio::test]
                async fn fork() {
                    super::$name(hybrid_worker::worker::Isolation::Fork).await
                }
            }
        )*
    };
}

/// The cgroup v2 folder the cgroup tests make their cgroups in: the test process's own (its
/// parent when the process sits in the daemon leaf), when it is root and can write there.
/// `None` (the test is skipped, and says so) elsewhere, unless `HYBRID_TEST_REQUIRE_CGROUP=1`
/// (tests/run.sh), where that is a failure.
pub fn cgroup_base(test: &str) -> Option<PathBuf> {
    use hybrid_worker::sandbox::cgroup::{DAEMON_LEAF, own_cgroup};
    let usable = || -> Result<PathBuf, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("the tests do not run as root".into());
        }
        let own = own_cgroup()?;
        let base = match own.parent() {
            Some(parent) if own.file_name() == Some(DAEMON_LEAF.as_ref()) => parent.to_path_buf(),
            _ => own,
        };
        nix::unistd::access(&base, nix::unistd::AccessFlags::W_OK)
            .map_err(|e| format!("{} is not writable: {e}", base.display()))?;
        Ok(base)
    };
    match usable() {
        Ok(base) => Some(base),
        Err(why) if std::env::var("HYBRID_TEST_REQUIRE_CGROUP").as_deref() == Ok("1") => panic!(
            "{test} needs root and a writable cgroup v2 folder (HYBRID_TEST_REQUIRE_CGROUP=1): {why}"
        ),
        Err(why) => {
            eprintln!("SKIPPED {test}: it needs root and a writable cgroup v2 folder: {why}");
            None
        }
    }
}

/// A cgroup of a test's own under [`cgroup_base`], killed and removed (with its descendants)
/// when dropped.
pub struct TestCgroup {
    pub dir: PathBuf,
}

impl TestCgroup {
    pub fn new(base: &Path) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = base.join(format!(
            "hybrid-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&dir).expect("a test cgroup");
        Self { dir }
    }

    /// The pids in the cgroup `dir` (not its descendants).
    pub fn procs(dir: &Path) -> Vec<i32> {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The names of the cgroups directly under this one.
    pub fn children(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .expect("ls cgroup")
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn remove(dir: &Path) {
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        for _ in 0..200 {
            let events = std::fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
            if !events.contains("populated 1") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                Self::remove(&entry.path());
            }
        }
        if let Err(e) = std::fs::remove_dir(dir) {
            eprintln!("could not remove the test cgroup {}: {e}", dir.display());
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        Self::remove(&self.dir);
    }
}
