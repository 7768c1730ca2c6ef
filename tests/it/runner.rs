//! Real job processes: the diagnostics worker drives every outcome through the runner, and the
//! engine runs a real worker end to end over the in-memory broker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hybrid_worker::broker::memory::MemoryBroker;
use hybrid_worker::job::ErrorKind;
use hybrid_worker::runner::{KillReason, RunOutcome, RunReport, RunRequest};
use hybrid_worker::worker::Isolation;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

const SECRET: &str = "s3cr3t-daemon-credential";

/// Runs the diagnostics worker with `input`, collecting its log records.
async fn diagnostics(mode: Isolation, input: Value, timeout: Duration) -> (RunReport, Vec<String>) {
    let temp = tempfile::tempdir().expect("tmp");
    let ready = in_mode(ready_worker("diagnostics"), mode);
    let runner = runner(temp.path());
    let logs = Mutex::new(Vec::new());
    let on_log =
        |r: hybrid_worker::runner::output::LogRecord| logs.lock().expect("lock").push(r.msg);
    let request = RunRequest {
        worker: &ready.worker,
        python: ready.python.clone(),
        job_id: "job-1",
        attempt: 2,
        correlation_id: Some("corr-1"),
        input: &input,
        timeout,
        extra_env: vec![("TRACEPARENT".into(), "00-abc-def-01".into())],
    };
    let report = runner.run(request, CancellationToken::new(), &on_log).await;
    let logs = logs.into_inner().expect("lock");
    (report, logs)
}

fn failure(report: &RunReport) -> (ErrorKind, String, bool) {
    match &report.outcome {
        RunOutcome::Failed(e) => (e.kind, e.message.clone(), e.retryable),
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn output(report: &RunReport) -> Value {
    match &report.outcome {
        RunOutcome::Succeeded(v) => v.clone(),
        other => panic!(
            "expected success, got {other:?} (stderr: {})",
            report.stderr.text()
        ),
    }
}

const T: Duration = Duration::from_secs(20);

async fn no_daemon_environment_reaches_a_job(mode: Isolation) {
    // SAFETY: set once before any job starts; the value is only read by children.
    unsafe { std::env::set_var("HYBRID_TEST_DAEMON_SECRET", SECRET) };
    let (report, _) = diagnostics(mode, json!({"action": "env"}), T).await;
    let env = output(&report)["env"].as_object().expect("env map").clone();
    let allowed = [
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "HYBRID_JOB_ID",
        "HYBRID_ATTEMPT",
        "HYBRID_WORKER",
        "TRACEPARENT",
        "LC_CTYPE",
    ];
    for (key, value) in &env {
        assert!(
            allowed.contains(&key.as_str()),
            "unexpected variable {key} in the job"
        );
        assert!(!value.as_str().unwrap_or("").contains(SECRET));
    }
    assert_eq!(env["HYBRID_JOB_ID"], "job-1");
    assert_eq!(env["TRACEPARENT"], "00-abc-def-01");
}

async fn context_and_logs_reach_the_handler_and_the_daemon(mode: Isolation) {
    let (report, _) = diagnostics(mode, json!({"action": "context"}), T).await;
    let ctx = output(&report);
    assert_eq!(ctx["job_id"], "job-1");
    assert_eq!(ctx["attempt"], 2);
    assert_eq!(ctx["correlation_id"], "corr-1");
    assert!(ctx["remaining_s"].as_f64().expect("remaining") > 10.0);
    let (report, logs) = diagnostics(mode, json!({"action": "log", "lines": 3}), T).await;
    assert_eq!(output(&report)["logged"], 3);
    assert_eq!(logs.len(), 3, "{logs:?}");
}

async fn each_failure_has_its_kind(mode: Isolation) {
    let (r, _) = diagnostics(mode, json!({"action": "fail", "message": "flaky"}), T).await;
    let (kind, message, retryable) = failure(&r);
    assert_eq!((kind, retryable), (ErrorKind::HandlerError, true));
    assert!(message.contains("flaky"));
    assert!(
        r.stderr.text().contains("Traceback"),
        "the traceback goes to stderr"
    );

    let (r, _) = diagnostics(
        mode,
        json!({"action": "invalid", "message": "bad field"}),
        T,
    )
    .await;
    let (kind, message, retryable) = failure(&r);
    assert_eq!((kind, retryable), (ErrorKind::InvalidInput, false));
    assert_eq!(message, "bad field");

    let (r, _) = diagnostics(mode, json!({"action": "signal", "signal": "SIGSEGV"}), T).await;
    let (kind, message, _) = failure(&r);
    assert_eq!(kind, ErrorKind::Crashed);
    assert!(message.contains("SIGSEGV"), "{message}");

    let (r, _) = diagnostics(mode, json!({"action": "exit", "code": 3}), T).await;
    let (kind, message, _) = failure(&r);
    assert_eq!(kind, ErrorKind::Crashed);
    assert!(message.contains("code 3"), "{message}");

    let (r, _) = diagnostics(mode, json!({"action": "alloc", "mb": 4096}), T).await;
    assert_eq!(failure(&r).0, ErrorKind::MemoryLimit);

    let (r, _) = diagnostics(mode, json!({"action": "result", "kb": 1024}), T).await;
    assert_eq!(failure(&r).0, ErrorKind::ResultTooLarge);
}

async fn a_deadline_kills_the_whole_job_even_if_it_ignores_sigterm(mode: Isolation) {
    let started = std::time::Instant::now();
    let (r, _) = diagnostics(
        mode,
        json!({"action": "sleep", "seconds": 60, "ignore_sigterm": true}),
        Duration::from_secs(1),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(failure(&r).0, ErrorKind::Timeout);
    assert_eq!(r.killed, Some(KillReason::Timeout));
    assert!(took < Duration::from_secs(6), "took {took:?}");
}

async fn output_is_captured_and_capped(mode: Isolation) {
    let (r, _) = diagnostics(
        mode,
        json!({"action": "print", "bytes": 5_000_000, "stream": "stdout"}),
        T,
    )
    .await;
    assert_eq!(output(&r)["printed"], 5_000_000);
    assert_eq!(r.stdout.total, 5_000_000);
    assert_eq!(r.stdout.kept.len(), 256 * 1024, "kept up to max_output_kb");
}

async fn the_temp_folder_is_private_and_removed(mode: Isolation) {
    let (r, _) = diagnostics(mode, json!({"action": "cwd"}), T).await;
    let out = output(&r);
    let cwd = out["cwd"].as_str().expect("cwd");
    assert!(cwd.contains("hybrid-job-"));
    // A forked job's folder lies inside its warm parent's private folder.
    assert_eq!(
        cwd.contains("/hybrid-warm-diagnostics-"),
        mode == Isolation::Fork,
        "{cwd}"
    );
    assert!(!std::path::Path::new(cwd).exists(), "removed after the job");
}

async fn resources_are_measured(mode: Isolation) {
    let (r, _) = diagnostics(mode, json!({"action": "spin", "seconds": 0.3}), T).await;
    output(&r);
    assert!(r.resources.cpu_ms >= 200, "{:?}", r.resources);
    assert!(r.resources.max_rss_kb > 1000, "{:?}", r.resources);
}

async fn the_engine_runs_a_real_worker_end_to_end(mode: Isolation) {
    let temp = tempfile::tempdir().expect("tmp");
    let executor = Arc::new(process_executor_in(
        &["csv-normalize", "diagnostics"],
        temp.path(),
        mode,
    ));
    let broker = Arc::new(MemoryBroker::new(JOBS, Duration::from_secs(30), 10));
    let input: Value = serde_json::from_str(
        &std::fs::read_to_string(workers_dir().join("csv-normalize/examples/basic.json"))
            .expect("example"),
    )
    .expect("json");
    broker.push(job_message(
        "csv-1",
        &json!({"worker": "csv-normalize", "input": input}),
    ));
    broker.push(job_message(
        "bad-1",
        &json!({"worker": "diagnostics", "input": {"action": "invalid", "message": "no"}}),
    ));
    let run = start(broker.clone(), executor, options(2));
    wait_for(Duration::from_secs(60), "two replies", || {
        broker.messages(RESULTS).len() == 2
    })
    .await;
    wait_for(Duration::from_secs(10), "settlement", || {
        broker.locked_count() == 0
    })
    .await;
    run.stop().await;
    let replies = replies(&broker, RESULTS);
    let body = &replies["csv-1"].1;
    assert_eq!(body["status"], "succeeded", "{body}");
    assert!(body["output"]["rows"].is_array());
    assert!(body["resources"]["max_rss_kb"].as_u64().expect("rss") > 0);
    assert_eq!(replies["bad-1"].1["error"]["kind"], "InvalidInput");
    assert_eq!(broker.dead_letters().len(), 1);
}

/// Every job is a process of its own, leader of its own group, and starts from a clean
/// interpreter: in fork mode each is a child of the one warm parent, which survives them.
async fn each_job_is_a_fresh_process(mode: Isolation) {
    let temp = tempfile::tempdir().expect("tmp");
    let ready = in_mode(ready_worker("diagnostics"), mode);
    let runner = runner(temp.path());
    let input = json!({"action": "process"});
    let mut seen = Vec::new();
    for n in 0..3 {
        let job_id = format!("job-{n}");
        let request = RunRequest {
            worker: &ready.worker,
            python: ready.python.clone(),
            job_id: &job_id,
            attempt: 1,
            correlation_id: None,
            input: &input,
            timeout: T,
            extra_env: Vec::new(),
        };
        let report = runner.run(request, CancellationToken::new(), &|_| {}).await;
        let out = output(&report);
        assert_eq!(out["earlier_jobs"], json!([]), "a job saw an earlier one");
        assert_eq!(
            out["pgid"], out["pid"],
            "the job leads its own process group"
        );
        seen.push(out);
    }
    assert!(seen[0]["pid"] != seen[1]["pid"] && seen[1]["pid"] != seen[2]["pid"]);
    let parent = runner.warm_pool().parent_pid("diagnostics").await;
    match mode {
        Isolation::Spawn => {
            assert_eq!(parent, None);
            assert_eq!(seen[0]["ppid"], std::process::id());
        }
        Isolation::Fork => {
            let parent = parent.expect("a warm parent");
            assert!(seen.iter().all(|o| o["ppid"] == parent), "{seen:?}");
        }
    }
}

/// A warm parent that dies is replaced at the next job, which runs normally.
#[tokio::test]
async fn a_dead_warm_parent_is_restarted() {
    let temp = tempfile::tempdir().expect("tmp");
    let ready = in_mode(ready_worker("diagnostics"), Isolation::Fork);
    let runner = runner(temp.path());
    let input = json!({"action": "process"});
    let run = || {
        let request = RunRequest {
            worker: &ready.worker,
            python: ready.python.clone(),
            job_id: "job",
            attempt: 1,
            correlation_id: None,
            input: &input,
            timeout: T,
            extra_env: Vec::new(),
        };
        runner.run(request, CancellationToken::new(), &|_| {})
    };
    let first = output(&run().await);
    let parent = runner
        .warm_pool()
        .parent_pid("diagnostics")
        .await
        .expect("a warm parent");
    assert_eq!(first["ppid"], parent);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(parent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    wait_for(Duration::from_secs(5), "the parent to be seen dead", || {
        std::fs::read_to_string(format!("/proc/{parent}/stat")).is_err()
    })
    .await;
    let second = output(&run().await);
    let new_parent = runner
        .warm_pool()
        .parent_pid("diagnostics")
        .await
        .expect("a new warm parent");
    assert_ne!(new_parent, parent);
    assert_eq!(second["ppid"], new_parent);
}

/// A job the daemon cannot start (here: its temp folder's base is gone) is the daemon's fault,
/// never the job's `Crashed`.
async fn a_job_the_daemon_cannot_start_is_a_daemon_fault(mode: Isolation) {
    let temp = tempfile::tempdir().expect("tmp");
    let ready = in_mode(ready_worker("diagnostics"), mode);
    let runtime = hybrid_worker::python_runtime::Runtime::install(temp.path()).expect("runtime");
    let gone = temp.path().join("no-such-folder");
    let runner = hybrid_worker::runner::Runner::new(runtime, gone).expect("runner");
    let input = json!({"action": "echo", "value": 1});
    let request = RunRequest {
        worker: &ready.worker,
        python: ready.python.clone(),
        job_id: "job-fault",
        attempt: 1,
        correlation_id: None,
        input: &input,
        timeout: T,
        extra_env: vec![],
    };
    let report = runner.run(request, CancellationToken::new(), &|_| {}).await;
    let RunOutcome::DaemonFault(fault) = &report.outcome else {
        panic!("expected a daemon fault, got {:?}", report.outcome);
    };
    let expected = match mode {
        Isolation::Spawn => "temp_folder",
        Isolation::Fork => "warm_parent",
    };
    assert_eq!(fault.stage.as_str(), expected, "{fault}");
    assert!(fault.message.contains("no-such-folder"), "{fault}");
}

/// A root daemon's job runs as the job user even with the default `python3` (on this kind of
/// machine a pyenv build under `/root`, which the job user cannot enter: the daemon uses a copy
/// under its system folder).
async fn a_root_daemons_job_never_runs_as_root(mode: Isolation) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let (report, _) = diagnostics(mode, json!({"action": "process"}), T).await;
    let out = output(&report);
    assert_eq!(out["uid"], 65534, "{out}");
    assert_eq!(out["euid"], 65534, "{out}");
}

/// A daemon holding more descriptors than a job may have (1024) still starts jobs: the job's
/// own descriptors keep low numbers whatever the daemon's are.
async fn a_job_starts_while_the_daemon_holds_more_descriptors_than_a_job_may(mode: Isolation) {
    use std::os::fd::AsRawFd;
    let limit = hybrid_worker::runner::child::raise_descriptor_limit(1).expect("getrlimit");
    if limit < 1200 {
        eprintln!("skipped: this process may open only {limit} descriptors");
        return;
    }
    let held: Vec<std::fs::File> = (0..1100)
        .map(|_| std::fs::File::open("/dev/null").expect("open /dev/null"))
        .collect();
    assert!(
        held.iter().any(|f| f.as_raw_fd() > 1024),
        "the test holds descriptors above 1024"
    );
    let (report, _) = diagnostics(mode, json!({"action": "echo", "value": 1}), T).await;
    assert_eq!(output(&report)["echo"], 1);
    drop(held);
}

crate::in_both_modes!(
    a_root_daemons_job_never_runs_as_root,
    a_job_the_daemon_cannot_start_is_a_daemon_fault,
    a_job_starts_while_the_daemon_holds_more_descriptors_than_a_job_may,
    each_job_is_a_fresh_process,
    no_daemon_environment_reaches_a_job,
    context_and_logs_reach_the_handler_and_the_daemon,
    each_failure_has_its_kind,
    a_deadline_kills_the_whole_job_even_if_it_ignores_sigterm,
    output_is_captured_and_capped,
    the_temp_folder_is_private_and_removed,
    resources_are_measured,
    the_engine_runs_a_real_worker_end_to_end,
);
