//! What each command does. A command returns its exit code; an error is mapped to exit code 2
//! when it is the user's to fix (usage, configuration, a missing venv), else 1.

pub mod config_show;
pub mod dlq;
pub mod exec;
pub mod run;
pub mod submit;
pub mod workers;

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Settings;
use crate::python_runtime::Runtime;
use crate::worker::pin::Places;
use crate::worker::python::{Interpreter, PythonError};
use crate::worker::venv::{VenvPlan, VenvState};
use crate::worker::{Catalog, Worker};

/// An error the user fixes by changing what they typed or configured (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit codes (`docs/contracts.md` §6).
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

/// The exit code for an error that ended a command.
pub fn exit_code_for(error: &anyhow::Error) -> ExitCode {
    let usage = error.chain().any(|cause| {
        cause.is::<UsageError>()
            || cause.is::<crate::config::ConfigError>()
            || cause.is::<crate::worker::WorkerError>()
            || cause.is::<crate::worker::python::PythonError>()
            || cause.is::<crate::worker::VenvError>()
            || cause.is::<crate::emulator::entities::EntitiesError>()
            || cause.is::<crate::servicebus::target::TargetError>()
    });
    ExitCode::from(if usage { EXIT_USAGE } else { EXIT_FAILED })
}

/// The workers folder: `--workers-dir`, else the configured one.
pub fn workers_dir(settings: &Settings, flag: &Option<PathBuf>) -> PathBuf {
    flag.clone().unwrap_or_else(|| settings.workers.dir.clone())
}

/// The command that (re)builds a worker's venv, quoted in every refusal.
pub fn build_command(worker: &str, dir: &std::path::Path) -> String {
    if dir == std::path::Path::new("workers") {
        format!("hybrid-worker workers build {worker}")
    } else {
        format!(
            "hybrid-worker workers build {worker} --workers-dir {}",
            dir.display()
        )
    }
}

/// A worker whose venv is ready, or the reason it is not, naming the fixing command.
pub fn ready_python(
    worker: &Worker,
    python: &Interpreter,
    settings: &Settings,
    dir: &std::path::Path,
) -> anyhow::Result<PathBuf> {
    let plan = VenvPlan::new(worker, python, &settings.workers.venv_root())?;
    match plan.state() {
        VenvState::Ready { python, .. } => Ok(python),
        VenvState::Missing { expected, stale } => {
            let what = match stale {
                Some(old) => format!(
                    "its venv {} does not match requirements.txt and Python {} (a stale one is at {})",
                    expected.display(),
                    python.version,
                    old.display()
                ),
                None => format!("its venv {} has not been built", expected.display()),
            };
            Err(UsageError(format!(
                "worker {:?} cannot run: {what}; run `{}`",
                worker.name,
                build_command(&worker.name, dir)
            ))
            .into())
        }
    }
}

/// The runtime installed under the configured temp folder.
pub fn install_runtime(settings: &Settings) -> anyhow::Result<Runtime> {
    let base = settings.engine.temp_dir();
    Runtime::install(&base).map_err(|e| {
        anyhow::anyhow!(
            "cannot write the Python runtime under {}: {e} (set HYBRID__ENGINE__TEMP_DIR to a writable folder)",
            base.display()
        )
    })
}

/// The configured claim-check storage, or `None` without `[storage]`. The Entra ID credential
/// (for `storage.account_url`) is the daemon's, as chosen by `servicebus.credential`.
pub fn storage(
    settings: &Settings,
) -> anyhow::Result<Option<std::sync::Arc<crate::storage::Storage>>> {
    let source = settings.servicebus.credential;
    let storage = crate::storage::Storage::from_settings(&settings.storage, || {
        crate::servicebus::credential::entra_credential(source).map_err(|e| e.0)
    })
    .map_err(|e| UsageError(e.to_string()))?;
    if let Some(storage) = &storage {
        tracing::info!(storage = ?storage, "Claim-check Blob Storage is configured.");
    }
    Ok(storage.map(std::sync::Arc::new))
}

/// Scans the workers folder, refusing broken workers loudly. For a root daemon, a worker whose
/// folder the job user cannot reach is loaded from a copy it can read ([`Worker::for_jobs`]).
pub fn scan(settings: &Settings, dir: &std::path::Path) -> anyhow::Result<Catalog> {
    let mut catalog = Catalog::scan(dir)?;
    for broken in &catalog.broken {
        tracing::warn!(error = %broken, "A worker cannot be loaded.");
    }
    let sb = &settings.sandbox;
    let mut readable = std::collections::BTreeMap::new();
    for (name, worker) in std::mem::take(&mut catalog.workers) {
        let worker = worker.for_jobs(sb.user, sb.group, &settings.workers.system_dir)?;
        readable.insert(name, worker);
    }
    catalog.workers = readable;
    Ok(catalog)
}

/// Each worker's interpreter, resolved once per pin: its `python` requirement found on the host
/// ([`Places::find`]), else the configured `workers.python`; for a root daemon whose job user
/// cannot reach it, a copy it can read ([`Interpreter::for_jobs`]).
#[derive(Debug)]
pub struct Interpreters<'a> {
    settings: &'a Settings,
    places: Places,
    /// By pin (`None`: `workers.python`).
    found: std::collections::BTreeMap<Option<String>, Interpreter>,
}

impl<'a> Interpreters<'a> {
    pub fn new(settings: &'a Settings) -> Self {
        Self {
            settings,
            places: Places::from_env(),
            found: Default::default(),
        }
    }

    /// The interpreter `worker`'s venv is built from, or why there is none (naming the
    /// command that installs one).
    pub fn for_worker(&mut self, worker: &Worker) -> Result<Interpreter, UsageError> {
        self.resolve(worker)
            .map_err(|e| UsageError(format!("worker {:?}: {e}", worker.name)))
    }

    fn resolve(&mut self, worker: &Worker) -> Result<Interpreter, PythonError> {
        let pin = worker.spec.python.as_ref();
        let key = pin.map(ToString::to_string);
        if let Some(found) = self.found.get(&key) {
            return Ok(found.clone());
        }
        let resolved = match pin {
            Some(requirement) => self.places.find(requirement)?,
            None => Interpreter::resolve(&self.settings.workers.python)?,
        };
        let sb = &self.settings.sandbox;
        let usable = resolved.for_jobs(sb.user, sb.group, &self.settings.workers.system_dir)?;
        self.found.insert(key, usable.clone());
        Ok(usable)
    }
}

/// The runner of `run` and `exec`, set up the same way: the daemon hardened (non-dumpable),
/// the sandbox as configured (job cgroups set up, which may move the daemon into its leaf),
/// the runtime installed, and the sandbox checked against `ready` (see
/// [`check_required_sandbox`]).
pub fn runner_for(
    settings: &Settings,
    ready: &[crate::engine::executor::ReadyWorker],
) -> anyhow::Result<crate::runner::Runner> {
    crate::sandbox::harden_daemon();
    let sandbox = crate::sandbox::Sandbox::new(settings.sandbox.clone())
        .map_err(|e| UsageError(e.to_string()))?;
    let runner = crate::runner::Runner::with_sandbox(
        install_runtime(settings)?,
        settings.engine.temp_dir(),
        sandbox,
    );
    check_required_sandbox(settings, &runner, ready)?;
    let governance = governance(settings, &runner, ready)?;
    Ok(runner.with_governance(governance))
}

/// The secrets folder and token source of jobs (docs/secrets.md), after the start-up report
/// of each worker's secrets and scopes. Refuses to start when jobs could read the secrets
/// folder; builds the daemon's Entra ID credential (`servicebus.credential`) only when a
/// worker declares `azure_scopes`.
fn governance(
    settings: &Settings,
    runner: &crate::runner::Runner,
    ready: &[crate::engine::executor::ReadyWorker],
) -> Result<crate::secrets::Governance, UsageError> {
    use crate::secrets::audit::{Level, audit};
    let secrets_dir = settings.secrets.dir();
    let mut refused = Vec::new();
    for r in ready {
        let spec = &r.worker.spec;
        if spec.secrets.is_empty() && spec.azure_scopes.is_empty() {
            continue;
        }
        tracing::info!(worker = %r.worker.name, secrets = ?spec.secrets, azure_scopes = ?spec.azure_scopes, "The worker's jobs are handed these secrets and may ask for tokens for these scopes.");
        let policy = runner.policy(&r.worker, &r.python);
        for f in audit(&r.worker, secrets_dir, &policy) {
            match f.level {
                Level::Refuse => refused.push(format!("worker {:?}: {}", r.worker.name, f.text)),
                Level::Error | Level::Warning => {
                    tracing::warn!(worker = %r.worker.name, "Secrets: {}", f.text);
                }
            }
        }
    }
    if !refused.is_empty() {
        return Err(UsageError(format!(
            "jobs could read the secrets folder:\n  {}",
            refused.join("\n  ")
        )));
    }
    let tokens = match ready
        .iter()
        .find(|r| !r.worker.spec.azure_scopes.is_empty())
    {
        None => None,
        Some(r) => {
            let source = settings.servicebus.credential;
            let credential = crate::servicebus::credential::entra_credential(source).map_err(|e| {
                UsageError(format!(
                    "worker {:?} declares azure_scopes, and the daemon's Entra ID credential (servicebus.credential = {source:?}) cannot be built: {e}",
                    r.worker.name
                ))
            })?;
            Some(std::sync::Arc::new(
                crate::secrets::tokens::TokenBroker::new(credential),
            ))
        }
    };
    Ok(crate::secrets::Governance {
        secrets_dir: secrets_dir.map(std::path::Path::to_path_buf),
        tokens,
    })
}

/// Refuses to start (exit 2) when a root daemon's jobs would stay root (their user cannot
/// reach what they need), or when a mechanism `sandbox.require` names is off for a worker,
/// naming each one and why.
pub fn check_required_sandbox(
    settings: &Settings,
    runner: &crate::runner::Runner,
    ready: &[crate::engine::executor::ReadyWorker],
) -> Result<(), UsageError> {
    let root = nix::unistd::geteuid().is_root();
    let required = &settings.sandbox.require;
    let mut missing = Vec::new();
    for r in ready {
        let enforcement = runner.enforcement(&r.worker, &r.python);
        if root && let Some(user) = enforcement.iter().find(|e| e.mechanism == "user" && !e.on) {
            return Err(UsageError(format!(
                "a root daemon runs jobs as another user, and for worker {:?} it cannot: {} (a job never runs as uid 0; make what it reads readable by uid {} (sandbox.user), grant the capabilities, or run the daemon as a non-root user)",
                r.worker.name, user.detail, settings.sandbox.user
            )));
        }
        for why in crate::sandbox::unmet(required, &enforcement) {
            missing.push(format!("worker {:?}: {why}", r.worker.name));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(UsageError(format!(
        "sandbox.require names mechanisms that are off here:\n  {}",
        missing.join("\n  ")
    )))
}
