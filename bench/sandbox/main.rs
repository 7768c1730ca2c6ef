//! Start-up cost of the job sandbox: a trivial job, run N times with each mechanism alone,
//! with all of them, and with none; prints the median and 90th percentile of the whole run
//! (fork, sandbox, Python start, job, exit) and of the daemon-side preparation alone.
//!
//! `bench/sandbox/run.sh [N]` builds it in release mode and runs it. It needs an interpreter
//! an unprivileged user can reach (`/usr/bin/python3`, or `HYBRID_BENCH_PYTHON`) so that, run
//! as root, the uid drop is part of what is measured.

use std::path::Path;
use std::time::{Duration, Instant};

use hybrid_worker::python_runtime::Runtime;
use hybrid_worker::runner::{RunOutcome, RunRequest, Runner};
use hybrid_worker::sandbox::{Mechanisms, Sandbox, SandboxSettings};
use hybrid_worker::worker::Worker;
use hybrid_worker::worker::python::Interpreter;
use hybrid_worker::worker::venv::{VenvPlan, VenvState};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(30);
    let python_cmd = std::env::var("HYBRID_BENCH_PYTHON").unwrap_or_else(|_| {
        if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3".into()
        } else {
            "python3".into()
        }
    });
    let python = Interpreter::resolve(&python_cmd)?;
    let home = tempfile::Builder::new().prefix("hybrid-bench-").tempdir()?;
    open_to_all(home.path())?;
    let worker_dir = home.path().join("workers/benign");
    std::fs::create_dir_all(&worker_dir)?;
    open_to_all(&home.path().join("workers"))?;
    open_to_all(&worker_dir)?;
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile-workers/benign");
    for file in ["worker.toml", "requirements.txt", "benign.py"] {
        std::fs::copy(fixture.join(file), worker_dir.join(file))?;
    }
    let worker = Worker::load(&worker_dir)?;
    let plan = VenvPlan::new(&worker, &python, &home.path().join("venvs"))?;
    plan.build(&python, &|_| {})?;
    let VenvState::Ready {
        python: venv_python,
        ..
    } = plan.state()
    else {
        anyhow::bail!("the benchmark venv is not ready");
    };
    let temp = home.path().join("jobs");
    std::fs::create_dir_all(&temp)?;
    open_to_all(&temp)?;
    let runtime = Runtime::install(&temp)?;

    let only = |f: fn(&mut Mechanisms)| {
        let mut m = Mechanisms::NONE;
        f(&mut m);
        m
    };
    let configs: Vec<(&str, Mechanisms)> = vec![
        ("none", Mechanisms::NONE),
        ("rlimits", only(|m| m.rlimits = true)),
        ("user", only(|m| m.user = true)),
        ("no_new_privs", only(|m| m.no_new_privs = true)),
        ("landlock", only(|m| m.landlock = true)),
        ("seccomp", only(|m| m.seccomp = true)),
        ("cgroup", only(|m| m.cgroup = true)),
        ("all", Mechanisms::ALL),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "{runs} runs each; python {} ({}); {} cores; uid {}",
        python.path.display(),
        python.version,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        nix::unistd::getuid()
    );
    println!(
        "{:<14} {:>10} {:>10} {:>12} {:>14}",
        "mechanisms", "median ms", "p90 ms", "+ms vs none", "prepare µs"
    );
    let full = Sandbox::new(SandboxSettings::default())?;
    let runners: Vec<(&str, Sandbox, Runner)> = configs
        .into_iter()
        .map(|(name, mechanisms)| {
            let sandbox = full.clone().with_mechanisms(mechanisms);
            let runner = Runner::with_sandbox(runtime.clone(), temp.clone(), sandbox.clone());
            (name, sandbox, runner)
        })
        .collect();
    let input = serde_json::json!({"n": 1});
    // Round-robin over the configurations, so that load from other processes on the machine
    // spreads evenly over them; round 0 warms the page cache and is not counted.
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); runners.len()];
    for round in 0..=runs {
        for (i, (name, _, runner)) in runners.iter().enumerate() {
            let request = RunRequest {
                worker: &worker,
                python: venv_python.clone(),
                job_id: "bench",
                attempt: 1,
                correlation_id: None,
                input: &input,
                timeout: Duration::from_secs(30),
                extra_env: Vec::new(),
            };
            let started = Instant::now();
            let report = rt.block_on(runner.run(request, CancellationToken::new(), &|_| {}));
            let took = started.elapsed();
            if !matches!(report.outcome, RunOutcome::Succeeded(_)) {
                anyhow::bail!("{name}: the job failed: {:?}", report.outcome);
            }
            if round > 0 {
                times[i].push(took);
            }
        }
    }
    let mut baseline = None;
    for ((name, sandbox, _), mut times) in runners.iter().zip(times) {
        let policy = sandbox.policy(&worker, &venv_python, &runtime.dir, &temp);
        let scratch = tempfile::tempdir_in(&temp)?;
        let mut prepare = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            let prepared = policy.prepare(scratch.path())?;
            prepare.push(started.elapsed());
            drop(prepared);
        }
        let median = percentile(&mut times, 50);
        let base = *baseline.get_or_insert(median);
        println!(
            "{:<14} {:>10.1} {:>10.1} {:>+12.1} {:>14.0}",
            name,
            ms(median),
            ms(percentile(&mut times, 90)),
            ms(median) - ms(base),
            percentile(&mut prepare, 50).as_secs_f64() * 1e6
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(values: &mut [Duration], p: usize) -> Duration {
    values.sort();
    values
        .get((values.len().saturating_sub(1)) * p / 100)
        .copied()
        .unwrap_or_default()
}

fn open_to_all(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}
