//! Hostile workers: each fixture under `tests/fixtures/hostile-workers/` tries to break out of
//! its sandbox. Each test asserts that the attempt failed with its documented outcome and that
//! the next job on the same runner still succeeds.
//!
//! The tests run one at a time: the job user's process limit is shared by its concurrent jobs,
//! so a fork bomb would starve the other tests' jobs (that is the caveat `docs/sandbox.md`
//! documents, not what these tests are about).

use std::time::Duration;

use hybrid_worker::job::ErrorKind;
use hybrid_worker::runner::warm::Threads;
use hybrid_worker::runner::{KillReason, RunOutcome, RunReport, RunRequest, Runner};
use hybrid_worker::sandbox::{Mechanisms, Sandbox, SandboxSettings};
use hybrid_worker::worker::Isolation;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

const SECRET: &str = "hostile-test-daemon-secret-7f3a";
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One daemon's runner: its temp folder lives as long as the test.
struct Daemon {
    runner: Runner,
    mode: Isolation,
    // Last: the runner's warm parents live in it until the runner is dropped.
    _temp: tempfile::TempDir,
}

/// The uid of the hostile suite's jobs: its own, so that the process counts the fork bombs
/// test (RLIMIT_NPROC is per uid, across the machine) are not shared with the other tests
/// running meanwhile as 65534, and zombies a bomb leaves for init cannot starve them.
const HOSTILE_UID: u32 = 210_000;

fn own_uid() -> SandboxSettings {
    SandboxSettings {
        user: HOSTILE_UID,
        group: 65534,
        ..SandboxSettings::default()
    }
}

impl Daemon {
    fn new(mode: Isolation) -> Self {
        let temp = tempfile::tempdir().expect("tmp");
        let runner = sandboxed_runner_with(temp.path(), own_uid());
        Self {
            _temp: temp,
            runner,
            mode,
        }
    }

    /// A daemon whose jobs take turns with `users` uids from an unused range.
    fn with_users(mode: Isolation, users: u32) -> Self {
        let temp = tempfile::tempdir().expect("tmp");
        let settings = SandboxSettings {
            user: 200_000,
            group: 65534,
            users,
            ..SandboxSettings::default()
        };
        let runner = sandboxed_runner_with(temp.path(), settings);
        Self {
            _temp: temp,
            runner,
            mode,
        }
    }

    /// A daemon with only the given mechanisms, and the default settings (job cgroups `auto`).
    fn with_mechanisms(mode: Isolation, mechanisms: Mechanisms) -> Self {
        let temp = tempfile::tempdir().expect("tmp");
        let sandbox = Sandbox::new(own_uid())
            .expect("auto")
            .with_mechanisms(mechanisms);
        let runner = sandboxed_runner_in(temp.path(), sandbox);
        Self {
            _temp: temp,
            runner,
            mode,
        }
    }

    async fn run(&self, worker: &str, input: Value, timeout: Duration) -> RunReport {
        let ready = in_mode(hostile_worker(worker), self.mode);
        let request = RunRequest {
            worker: &ready.worker,
            python: ready.python.clone(),
            job_id: "hostile-1",
            attempt: 1,
            correlation_id: None,
            input: &input,
            timeout,
            extra_env: Vec::new(),
        };
        self.runner
            .run(request, CancellationToken::new(), &|_| {})
            .await
    }

    /// The daemon is fine: a normal job on the same runner succeeds.
    async fn still_runs_jobs(&self) {
        let report = self
            .run("benign", json!({"n": 1}), Duration::from_secs(20))
            .await;
        match &report.outcome {
            RunOutcome::Succeeded(v) => assert_eq!(v["ok"], true),
            other => panic!(
                "the job after the attack failed: {other:?} (stderr: {})",
                report.stderr.text()
            ),
        }
    }
}

fn failure(report: &RunReport) -> (ErrorKind, String) {
    match &report.outcome {
        RunOutcome::Failed(e) => (e.kind, e.message.clone()),
        other => panic!(
            "expected a failure, got {other:?} (stderr: {})",
            report.stderr.text()
        ),
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

/// A denied call surfaces as Python's PermissionError, which the handler does not catch.
fn assert_permission_error(report: &RunReport) {
    let (kind, message) = failure(report);
    assert_eq!(kind, ErrorKind::HandlerError, "{message}");
    assert!(message.starts_with("PermissionError"), "{message}");
}

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn the_fixtures_run_with_every_mechanism_on() {
    let daemon = Daemon::new(Isolation::Spawn);
    let ready = hostile_worker("benign");
    let enforced = daemon.runner.enforcement(&ready.worker, &ready.python);
    for mechanism in [
        "user",
        "rlimits",
        "processes",
        "oom_score_adj",
        "no_new_privs",
        "seccomp",
        "landlock",
    ] {
        let e = enforced
            .iter()
            .find(|e| e.mechanism == mechanism)
            .expect(mechanism);
        assert!(e.on, "{mechanism} is not enforced here: {}", e.detail);
    }
}

async fn connecting_to_a_local_listener_is_refused(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let daemon = Daemon::new(mode);
    let report = daemon.run("net-connect", json!({"port": port}), T).await;
    assert_permission_error(&report);
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the listener was reached: {other:?}"),
    }
    daemon.still_runs_jobs().await;
}

async fn a_worker_whose_policy_allows_the_network_reaches_the_listener(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let daemon = Daemon::new(mode);
    let report = daemon.run("net-allowed", json!({"port": port}), T).await;
    assert_eq!(output(&report)["connected"], true);
    listener.set_nonblocking(true).expect("nonblocking");
    let (mut peer, _) = listener.accept().expect("the job's connection");
    peer.set_nonblocking(false).expect("blocking");
    let mut hello = String::new();
    std::io::Read::read_to_string(&mut peer, &mut hello).expect("read");
    assert_eq!(hello, "hello");
}

async fn the_environment_holds_only_the_allow_list(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    // SAFETY: the variable is only read by child processes started afterwards.
    unsafe { std::env::set_var("HYBRID_HOSTILE_SECRET", SECRET) };
    let daemon = Daemon::new(mode);
    let report = daemon.run("env-dump", json!({}), T).await;
    let env = output(&report)["env"].as_object().expect("env").clone();
    let allowed = [
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "HYBRID_JOB_ID",
        "HYBRID_ATTEMPT",
        "HYBRID_WORKER",
        "WORKER_SETTING",
        "LC_CTYPE",
    ];
    for (key, value) in &env {
        assert!(
            allowed.contains(&key.as_str()),
            "unexpected variable {key} in the job"
        );
        assert!(
            !value.to_string().contains(SECRET),
            "{key} holds the daemon's secret"
        );
    }
    assert_eq!(env["WORKER_SETTING"], "from-worker-toml");
    daemon.still_runs_jobs().await;
}

async fn a_secret_file_of_the_daemon_is_unreadable(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let secrets = tempfile::tempdir().expect("tmp");
    let path = secrets.path().join("credentials");
    std::fs::write(&path, SECRET).expect("write");
    // Readable by every user: only the sandbox's file rules stand in the way.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(secrets.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let daemon = Daemon::new(mode);
    let report = daemon
        .run("read-secret-file", json!({"path": path}), T)
        .await;
    assert_permission_error(&report);
    assert!(!report.stderr.text().contains(SECRET));
    daemon.still_runs_jobs().await;
}

async fn the_daemons_proc_environ_is_unreadable(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    // SAFETY: as above; children started afterwards see it in the daemon's /proc environ only.
    unsafe { std::env::set_var("HYBRID_HOSTILE_SECRET", SECRET) };
    let daemon = Daemon::new(mode);
    let report = daemon
        .run("read-daemon-environ", json!({"pid": std::process::id()}), T)
        .await;
    assert_permission_error(&report);
    assert!(!report.stderr.text().contains(SECRET));
    daemon.still_runs_jobs().await;
}

async fn writing_outside_the_temp_folder_fails(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let outside = tempfile::tempdir().expect("tmp");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod");
    let target = outside.path().join("escaped.txt");
    let daemon = Daemon::new(mode);
    let report = daemon
        .run("write-outside", json!({"path": target}), T)
        .await;
    assert_permission_error(&report);
    assert!(!target.exists(), "the job wrote outside its temp folder");
    daemon.still_runs_jobs().await;
}

/// Processes of `uid` now.
fn processes_of(uid: u32) -> usize {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| e.metadata().is_ok_and(|m| m.uid() == uid))
        .count()
}

/// Processes of `uid` whose parent is PID 1: orphans left for init to reap (on some hosts it
/// never does, and their zombies keep counting against the uid's process limit).
fn handed_to_init(uid: u32) -> usize {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter(|e| e.metadata().is_ok_and(|m| m.uid() == uid))
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1).map(str::to_owned))
                .is_some_and(|ppid| ppid == "1")
        })
        .count()
}

async fn a_fork_bomb_is_contained_and_killed(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    // Counted after a first job: in fork mode the worker's warm parent (HOSTILE_UID) stays.
    daemon.still_runs_jobs().await;
    let before = processes_of(HOSTILE_UID);
    let report = daemon.run("fork-bomb", json!({}), T).await;
    let (kind, message) = failure(&report);
    assert_eq!(kind, ErrorKind::HandlerError, "{message}");
    assert!(message.contains("fork refused after"), "{message}");
    let made: u64 = message
        .split("after ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("count of children");
    assert!(
        made < 16,
        "the handler made {made} children with max_processes = 16"
    );
    // The bomb's orphans came to the daemon (a subreaper), never to PID 1; in spawn mode they
    // are reaped before the job's report is returned.
    assert_eq!(
        handed_to_init(HOSTILE_UID),
        0,
        "orphans of the bomb were left to PID 1"
    );
    if mode == Isolation::Spawn {
        assert_eq!(
            processes_of(HOSTILE_UID),
            before,
            "the bomb's processes were not all reaped when the job ended"
        );
    }
    // In fork mode the fork-bomb worker's own warm parent (HOSTILE_UID) and its spare child (forked
    // ahead for the next job) stay, and are no bomb.
    let warm_parent = 2 * usize::from(
        daemon
            .runner
            .warm_pool()
            .parent_pid("fork-bomb")
            .await
            .is_some(),
    );
    wait_for(
        Duration::from_secs(5),
        "the bomb's processes to die",
        || processes_of(HOSTILE_UID) <= before + warm_parent,
    )
    .await;
    daemon.still_runs_jobs().await;
}

/// A fork bomb that holds its uid's process count at its limit (16) for 8 s, and a normal job
/// that starts two threads, started on the same daemon once the bomb's uid has 16 processes.
/// (A job that starts no thread or process is not affected: the kernel lets `exec` through at
/// the limit.)
async fn bomb_and_neighbour(daemon: &Daemon) -> (RunReport, RunReport) {
    // What an earlier bomb on this uid left (zombies that init has yet to reap) would still
    // count against the limit.
    wait_for(
        Duration::from_secs(10),
        "no process of uid 200000 left by an earlier test",
        || processes_of(200_000) == 0,
    )
    .await;
    // In fork mode this starts the neighbour's warm parent before the bomb fills the table, so
    // that the neighbour's failure is the fork of its job, not the start of its parent.
    daemon.still_runs_jobs().await;
    let bomb = daemon.run("fork-bomb", json!({"hold_s": 8}), T);
    let neighbour = async {
        wait_for(
            Duration::from_secs(8),
            "the bomb to reach its limit",
            || processes_of(200_000) >= 16,
        )
        .await;
        daemon.run("benign", json!({"threads": 2}), T).await
    };
    tokio::join!(bomb, neighbour)
}

/// Spawn mode only: in fork mode a worker's jobs share its warm parent's one uid (a forked
/// child has no privilege left to change it), which the shared-uid test below covers.
#[tokio::test]
async fn with_a_uid_per_running_job_a_fork_bomb_does_not_starve_its_neighbour() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::with_users(Isolation::Spawn, 2);
    let (bomb, neighbour) = bomb_and_neighbour(&daemon).await;
    let (kind, message) = failure(&bomb);
    assert_eq!(kind, ErrorKind::HandlerError, "{message}");
    assert_eq!(output(&neighbour)["ok"], true);
    assert_eq!(
        output(&neighbour)["uid"],
        200_001,
        "the second running job has the second uid"
    );
    daemon.still_runs_jobs().await;
}

async fn with_one_shared_uid_a_fork_bomb_starves_its_neighbour_but_not_the_daemon(mode: Isolation) {
    // The documented caveat of `sandbox.users = 1`, and the control of the test above.
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::with_users(mode, 1);
    let (bomb, neighbour) = bomb_and_neighbour(&daemon).await;
    let (kind, message) = failure(&bomb);
    assert_eq!(kind, ErrorKind::HandlerError, "{message}");
    let (kind, message) = failure(&neighbour);
    // The neighbour's process exists (spawn mode execs it; fork mode forked it ahead as the
    // spare child), but the uid has no processes left for its threads.
    let _ = mode;
    assert_eq!(kind, ErrorKind::HandlerError, "{message}");
    assert!(message.contains("can't start new thread"), "{message}");
    daemon.still_runs_jobs().await;
}

async fn allocating_ten_times_the_memory_limit_fails_with_memory_limit(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let report = daemon.run("memory-hog", json!({}), T).await;
    assert_eq!(failure(&report).0, ErrorKind::MemoryLimit);
    daemon.still_runs_jobs().await;
}

async fn spinning_past_the_cpu_limit_is_a_timeout(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let report = daemon
        .run("cpu-spin", json!({}), Duration::from_secs(30))
        .await;
    let (kind, message) = failure(&report);
    assert_eq!(kind, ErrorKind::Timeout);
    assert!(message.contains("CPU limit"), "{message}");
    assert_eq!(
        report.killed, None,
        "the kernel stopped it, not the deadline"
    );
    daemon.still_runs_jobs().await;
}

async fn sleeping_past_the_deadline_with_sigterm_ignored_is_a_timeout(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let started = std::time::Instant::now();
    let report = daemon
        .run("deadline-sleeper", json!({}), Duration::from_secs(1))
        .await;
    assert_eq!(failure(&report).0, ErrorKind::Timeout);
    assert_eq!(report.killed, Some(KillReason::Timeout));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    daemon.still_runs_jobs().await;
}

async fn printing_a_gigabyte_succeeds_with_capped_output(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let report = daemon
        .run("stdout-flood", json!({}), Duration::from_secs(60))
        .await;
    assert_eq!(output(&report)["printed"], 1u64 << 30);
    assert_eq!(report.stdout.total, 1u64 << 30);
    assert_eq!(
        report.stdout.kept.len(),
        256 * 1024,
        "kept up to max_output_kb"
    );
    daemon.still_runs_jobs().await;
}

async fn a_100_mb_result_is_result_too_large(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let report = daemon
        .run("huge-result", json!({}), Duration::from_secs(30))
        .await;
    assert_eq!(failure(&report).0, ErrorKind::ResultTooLarge);
    daemon.still_runs_jobs().await;
}

/// True once `pid` is gone (or a zombie: dead, waiting for whoever adopted it to reap it).
fn is_dead(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('Z')),
    }
}

async fn a_grandchild_cannot_leave_the_group_or_outlive_the_job(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let report = daemon.run("grandchild", json!({}), T).await;
    let out = output(&report);
    let attempts = out["attempts"].as_str().expect("attempts");
    assert!(
        attempts.contains("setsid: [Errno 1] Operation not permitted"),
        "{attempts}"
    );
    assert!(
        attempts.contains("setpgid: [Errno 1] Operation not permitted"),
        "{attempts}"
    );
    assert_eq!(out["grandchild_pgid"], out["job_pgid"]);
    let pid = out["grandchild"].as_i64().expect("pid");
    wait_for(Duration::from_secs(5), "the grandchild to die", || {
        is_dead(pid)
    })
    .await;
    daemon.still_runs_jobs().await;
}

/// Runs the `setsid-grandchild` job on `daemon`, checks that its grandchild really left the
/// job's process group and session (so that the group kill cannot reach it), and returns the
/// grandchild's pid.
async fn an_escaped_grandchild(daemon: &Daemon) -> i32 {
    let report = daemon.run("setsid-grandchild", json!({}), T).await;
    let out = output(&report);
    assert_eq!(out["setsid"], "escaped", "{out}");
    assert_ne!(out["grandchild_pgid"], out["job_pgid"], "{out}");
    assert_ne!(out["grandchild_sid"], out["job_sid"], "{out}");
    i32::try_from(out["grandchild"].as_i64().expect("pid")).expect("a pid")
}

/// Seccomp refuses `setsid` (the test above); with seccomp off here, a grandchild leaves the
/// job's process group and session and closes the job's pipes, so only the job's cgroup can
/// find it at the job's end. The control, with job cgroups off, shows that nothing else does.
async fn an_escaped_grandchild_dies_with_the_job_cgroup(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    if cgroup_base("an_escaped_grandchild_dies_with_the_job_cgroup").is_none() {
        return;
    }
    let no_seccomp = Mechanisms {
        seccomp: false,
        ..Mechanisms::ALL
    };
    let daemon = Daemon::with_mechanisms(mode, no_seccomp);
    let pid = an_escaped_grandchild(&daemon).await;
    wait_for(
        Duration::from_secs(5),
        "the escaped grandchild to die with the job's cgroup",
        || is_dead(pid.into()),
    )
    .await;
    daemon.still_runs_jobs().await;

    let control = Daemon::with_mechanisms(
        mode,
        Mechanisms {
            cgroup: false,
            ..no_seccomp
        },
    );
    let pid = an_escaped_grandchild(&control).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let survived = !is_dead(pid.into());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(
        survived,
        "without job cgroups the escaped grandchild died too: this test no longer shows what the cgroup does"
    );
}

async fn a_job_cannot_kill_the_daemon(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let report = daemon
        .run("kill-parent", json!({"pid": std::process::id()}), T)
        .await;
    assert_permission_error(&report);
    daemon.still_runs_jobs().await;
}

crate::in_both_modes!(
    connecting_to_a_local_listener_is_refused,
    a_worker_whose_policy_allows_the_network_reaches_the_listener,
    the_environment_holds_only_the_allow_list,
    a_secret_file_of_the_daemon_is_unreadable,
    the_daemons_proc_environ_is_unreadable,
    writing_outside_the_temp_folder_fails,
    a_fork_bomb_is_contained_and_killed,
    with_one_shared_uid_a_fork_bomb_starves_its_neighbour_but_not_the_daemon,
    allocating_ten_times_the_memory_limit_fails_with_memory_limit,
    spinning_past_the_cpu_limit_is_a_timeout,
    sleeping_past_the_deadline_with_sigterm_ignored_is_a_timeout,
    printing_a_gigabyte_succeeds_with_capped_output,
    a_100_mb_result_is_result_too_large,
    a_grandchild_cannot_leave_the_group_or_outlive_the_job,
    an_escaped_grandchild_dies_with_the_job_cgroup,
    a_job_cannot_kill_the_daemon,
);

/// A thread a worker starts at import runs in its warm parent only: the parent reports it
/// (the daemon warns), and each job's child is a copy of the forking thread alone. A worker
/// that starts none reports none.
#[tokio::test]
async fn a_thread_started_at_import_is_reported_and_absent_from_each_job() {
    let daemon = Daemon::new(Isolation::Fork);
    let report = daemon
        .run("thread-at-import", json!({}), Duration::from_secs(20))
        .await;
    match &report.outcome {
        RunOutcome::Succeeded(v) => assert_eq!(v["threads"], json!(["MainThread"])),
        other => panic!("{other:?} (stderr: {})", report.stderr.text()),
    }
    let threads = daemon
        .runner
        .warm_pool()
        .parent_threads("thread-at-import")
        .await
        .expect("the warm parent runs");
    assert_eq!(threads.python, vec!["ticker".to_owned()]);
    assert!(threads.others >= 1, "{threads:?}");
    daemon.still_runs_jobs().await;
    let benign = daemon
        .runner
        .warm_pool()
        .parent_threads("benign")
        .await
        .expect("the warm parent runs");
    assert_eq!(benign, Threads::default());
}
