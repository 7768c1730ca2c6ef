//! `hybrid-worker workers list|build|verify`: the workers and their pinned venvs.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::{EXIT_FAILED, UsageError, build_command, scan, workers_dir};
use crate::cli::WorkersCommand;
use crate::config::Settings;
use crate::sandbox::Sandbox;
use crate::worker::python::Interpreter;
use crate::worker::venv::{VenvPlan, VenvState};
use crate::worker::{Catalog, Worker};

pub fn run(settings: &Settings, command: &WorkersCommand) -> anyhow::Result<ExitCode> {
    match command {
        WorkersCommand::List { dir } => list(settings, &workers_dir(settings, &dir.workers_dir)),
        WorkersCommand::Build { name, force, dir } => build(
            settings,
            &workers_dir(settings, &dir.workers_dir),
            name.as_deref(),
            *force,
        ),
        WorkersCommand::Verify { dir } => {
            verify(settings, &workers_dir(settings, &dir.workers_dir))
        }
    }
}

fn plan(settings: &Settings, worker: &Worker, python: &Interpreter) -> anyhow::Result<VenvPlan> {
    Ok(VenvPlan::new(
        worker,
        python,
        &settings.workers.venv_root(),
    )?)
}

fn state_word(plan: &Result<VenvPlan, anyhow::Error>) -> String {
    match plan {
        Ok(p) => match p.state() {
            VenvState::Ready { .. } => "ready".into(),
            VenvState::Missing { stale: Some(_), .. } => "stale".into(),
            VenvState::Missing { stale: None, .. } => "missing".into(),
        },
        Err(_) => "invalid".into(),
    }
}

/// What a worker's `python` column shows: the version, marked with its pin when it has one.
fn python_word(worker: &Worker, python: &Result<Interpreter, UsageError>) -> String {
    match (python, &worker.spec.python) {
        (Ok(p), None) => p.version.clone(),
        (Ok(p), Some(pin)) => format!("{} (pin {pin})", p.version),
        (Err(_), Some(pin)) => format!("MISSING (pin {pin})"),
        (Err(_), None) => "MISSING".into(),
    }
}

fn list(settings: &Settings, dir: &Path) -> anyhow::Result<ExitCode> {
    let catalog = scan(settings, dir)?;
    let mut interpreters = super::Interpreters::new(settings);
    println!(
        "{:<20} {:<28} {:<8} {:<20} {:>8} {:>8} {:>8} {:<7} DESCRIPTION",
        "NAME", "ENTRYPOINT", "VENV", "PYTHON", "TIMEOUT", "MEMORY", "ATTEMPTS", "NETWORK"
    );
    for worker in catalog.workers.values() {
        let limits = worker.limits();
        let python = interpreters.for_worker(worker);
        let venv = match &python {
            Ok(python) => state_word(&plan(settings, worker, python)),
            Err(_) => "no-python".into(),
        };
        println!(
            "{:<20} {:<28} {:<8} {:<20} {:>7}s {:>6}MB {:>8} {:<7} {}",
            worker.name,
            worker.spec.entrypoint,
            venv,
            python_word(worker, &python),
            limits.timeout_s,
            limits.memory_mb,
            limits.max_attempts,
            limits.network.to_string(),
            worker.spec.description
        );
    }
    for broken in &catalog.broken {
        println!("BROKEN {broken}");
    }
    println!(
        "\nvenv root: {}  python (unpinned workers): {}",
        settings.workers.venv_root().display(),
        settings.workers.python
    );
    Ok(ExitCode::SUCCESS)
}

fn selected<'a>(catalog: &'a Catalog, name: Option<&str>) -> anyhow::Result<Vec<&'a Worker>> {
    Ok(match name {
        Some(name) => vec![catalog.get(name)?],
        None => catalog.workers.values().collect(),
    })
}

fn build(
    settings: &Settings,
    dir: &Path,
    name: Option<&str>,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let catalog = scan(settings, dir)?;
    if catalog.workers.is_empty() {
        return Err(UsageError(format!("no workers in {}", dir.display())).into());
    }
    let mut interpreters = super::Interpreters::new(settings);
    let mut failed = 0;
    for worker in selected(&catalog, name)? {
        let python = match interpreters.for_worker(worker) {
            Ok(python) => python,
            Err(e) => {
                failed += 1;
                eprintln!("{}: {e}", worker.name);
                continue;
            }
        };
        let plan = plan(settings, worker, &python)?;
        if plan.state().is_ready() && !force {
            println!("{}: up to date at {}", worker.name, plan.dir.display());
            continue;
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_prefix(worker.name.clone());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {prefix}: {wide_msg} [{elapsed}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let started = std::time::Instant::now();
        let result = plan.build(&python, &|step| {
            bar.set_message(step.to_owned());
            if bar.is_hidden() {
                println!("{}: {step}", worker.name);
            }
        });
        bar.finish_and_clear();
        match result {
            Ok(()) => println!(
                "{}: built {} in {:.1}s",
                worker.name,
                plan.dir.display(),
                started.elapsed().as_secs_f64()
            ),
            Err(e) => {
                failed += 1;
                eprintln!("{}: {e}", worker.name);
            }
        }
    }
    Ok(if failed == 0 && catalog.broken.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// The sandbox of a worker's jobs, one line per mechanism: what is enforced, and how, or why
/// not.
fn print_sandbox(
    sandbox: &Sandbox,
    worker: &Worker,
    python: &Path,
    runtime_dir: &Path,
    temp_base: &Path,
    required: &[String],
) -> usize {
    let policy = sandbox.policy(worker, python, runtime_dir, temp_base);
    match worker.isolation() {
        crate::worker::Isolation::Spawn => println!(
            "        isolation spawn     a fresh interpreter per job; every mechanism below is applied before it starts"
        ),
        crate::worker::Isolation::Fork => println!(
            "        isolation fork      a warm parent (preload: {}) forks a child per job; the parent gets every mechanism below \
             (seccomp allowing setpgid); each child leads its own group, then adds its own Landlock layer (only its temp folder \
             writable) and the full seccomp filter; all of a worker's jobs share the parent's uid",
            if worker.spec.preload.is_empty() {
                "none".to_owned()
            } else {
                worker.spec.preload.join(", ")
            }
        ),
    }
    let mut unmet = 0;
    for e in policy.enforcement() {
        let state = if e.on { "on" } else { "OFF" };
        let mark = if !e.on && crate::sandbox::is_required(required, e.mechanism) {
            unmet += 1;
            " (required by sandbox.require)"
        } else {
            ""
        };
        println!(
            "        sandbox {:<14} {state:<3} {}{mark}",
            e.mechanism, e.detail
        );
    }
    unmet
}

/// The secrets (names only) and Entra ID scopes of a worker's jobs (docs/secrets.md), and
/// what the audit of the secrets folder found; returns how many findings fail `verify`.
fn print_secrets(
    settings: &Settings,
    worker: &Worker,
    policy: &crate::sandbox::SandboxPolicy,
) -> usize {
    use crate::secrets::audit::{Level, audit};
    let list = |items: &[String]| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    let spec = &worker.spec;
    let from = match settings.secrets.dir() {
        Some(dir) if !spec.secrets.is_empty() => format!(" (from {})", dir.display()),
        _ => String::new(),
    };
    println!("        secrets             {}{from}", list(&spec.secrets));
    println!("        azure_scopes        {}", list(&spec.azure_scopes));
    let mut failing = 0;
    for f in audit(worker, settings.secrets.dir(), policy) {
        let mark = match f.level {
            Level::Warning => "warning",
            Level::Error | Level::Refuse => {
                failing += 1;
                "ERROR"
            }
        };
        println!("        secrets {mark:<11} {}", f.text);
    }
    failing
}

fn verify(settings: &Settings, dir: &Path) -> anyhow::Result<ExitCode> {
    let catalog = scan(settings, dir)?;
    let mut interpreters = super::Interpreters::new(settings);
    // The same set-up as `run`'s, so that what is printed is what a daemon here enforces.
    let sandbox = Sandbox::new(settings.sandbox.clone()).map_err(|e| UsageError(e.to_string()))?;
    let temp_base = settings.engine.temp_dir();
    // Where `exec` and `run` install the runtime; verify only reads.
    let runtime_dir = crate::python_runtime::Runtime::dir_under(&temp_base);
    let mut bad = 0;
    for worker in catalog.workers.values() {
        let python = match interpreters.for_worker(worker) {
            Ok(python) => python,
            Err(e) => {
                bad += 1;
                println!("no-python {:<18} {e}", worker.name);
                continue;
            }
        };
        match plan(settings, worker, &python).map(|p| p.state()) {
            Ok(VenvState::Ready {
                dir,
                python: venv_python,
            }) => {
                println!("ok      {:<20} {}", worker.name, dir.display());
                println!(
                    "        python {:<15} {} ({})",
                    python.version,
                    python.path.display(),
                    match &worker.spec.python {
                        Some(pin) => format!("pinned by python = \"{pin}\""),
                        None => "workers.python".to_owned(),
                    }
                );
                bad += print_sandbox(
                    &sandbox,
                    worker,
                    &venv_python,
                    &runtime_dir,
                    &temp_base,
                    &settings.sandbox.require,
                );
                let policy = sandbox.policy(worker, &venv_python, &runtime_dir, &temp_base);
                bad += print_secrets(settings, worker, &policy);
            }
            Ok(VenvState::Missing { expected, stale }) => {
                bad += 1;
                let why = if stale.is_some() { "stale" } else { "missing" };
                println!(
                    "{why:<7} {:<20} {} — run `{}`",
                    worker.name,
                    expected.display(),
                    build_command(&worker.name, dir)
                );
            }
            Err(e) => {
                bad += 1;
                println!("invalid {:<20} {e}", worker.name);
            }
        }
    }
    for broken in &catalog.broken {
        bad += 1;
        println!("broken  {broken}");
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}
