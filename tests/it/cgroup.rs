//! Job cgroups on the real cgroup v2 file system: a job's process in a cgroup of its own in both
//! modes, removed after it; the cgroups of a daemon that is gone; a daemon that moves itself
//! into its leaf, or may not; and the report of a daemon that cannot write its cgroup. (The
//! hostile suite shows the kill of a grandchild that left the job's session.)
//!
//! Each test needs root and a writable cgroup v2 folder ([`cgroup_base`]); without them it is
//! skipped and says so, or fails when `HYBRID_TEST_REQUIRE_CGROUP=1` (tests/run.sh).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use hybrid_worker::runner::{RunOutcome, RunReport, RunRequest, Runner};
use hybrid_worker::sandbox::cgroup::{CgroupSetting, owner_tag};
use hybrid_worker::sandbox::{Sandbox, SandboxSettings};
use hybrid_worker::worker::Isolation;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// A runner whose job cgroups are made in `cgroup` (`sandbox.cgroup` = that path).
fn runner_in(temp: &Path, cgroup: &Path) -> Runner {
    sandboxed_runner_with(
        temp,
        SandboxSettings {
            cgroup: CgroupSetting::Path(cgroup.to_path_buf()),
            ..SandboxSettings::default()
        },
    )
}

async fn run_benign(runner: &Runner, mode: Isolation, input: Value) -> RunReport {
    let ready = in_mode(hostile_worker("benign"), mode);
    let request = RunRequest {
        worker: &ready.worker,
        python: ready.python.clone(),
        job_id: "cgroup-1",
        attempt: 1,
        correlation_id: None,
        input: &input,
        timeout: Duration::from_secs(20),
        extra_env: Vec::new(),
    };
    runner.run(request, CancellationToken::new(), &|_| {}).await
}

fn succeeded(report: &RunReport) -> &Value {
    match &report.outcome {
        RunOutcome::Succeeded(v) => v,
        other => panic!("{other:?} (stderr: {})", report.stderr.text()),
    }
}

/// The `0::` line of `/proc/<pid>/cgroup`.
fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_owned()
}

fn job_cgroups(test: &TestCgroup) -> Vec<String> {
    test.children()
        .into_iter()
        .filter(|c| c.starts_with("job-"))
        .collect()
}

async fn a_job_runs_in_a_cgroup_of_its_own_that_is_gone_after_it(mode: Isolation) {
    let Some(base) = cgroup_base("a_job_runs_in_a_cgroup_of_its_own_that_is_gone_after_it") else {
        return;
    };
    let test = TestCgroup::new(&base);
    let temp = tempfile::tempdir().expect("tmp");
    let runner = runner_in(temp.path(), &test.dir);
    // In fork mode this also starts the warm parent, which must stay out of job cgroups.
    succeeded(&run_benign(&runner, mode, json!({})).await);
    // In fork mode the warm parent's spare child (forked ahead for the next job) waits in the
    // cgroup of the next job; nothing else is left.
    let spare = spare_cgroup(&test, mode).await;

    let job = run_benign(&runner, mode, json!({"sleep_s": 1.5}));
    // While the job sleeps: its cgroup, each process in it, that process's own view of its
    // cgroup and its command line.
    let watch = async {
        let mut seen = None;
        wait_for(
            Duration::from_secs(10),
            "a job cgroup holding the job's process",
            || {
                seen = job_cgroups(&test)
                    .into_iter()
                    .filter(|name| spare.as_ref().is_none_or(|s| s == name))
                    .find_map(|name| {
                        let procs: Vec<(i32, String, String)> =
                            TestCgroup::procs(&test.dir.join(&name))
                                .into_iter()
                                .map(|pid| (pid, cgroup_of(pid), cmdline_of(pid)))
                                .collect();
                        (!procs.is_empty()).then_some((name, procs))
                    });
                seen.is_some()
            },
        )
        .await;
        seen
    };
    let (report, seen) = tokio::join!(job, watch);
    succeeded(&report);
    let (name, procs) = seen.expect("seen");
    assert!(
        name.starts_with(&format!("job-{}-", std::process::id())),
        "{name} is not named after its daemon"
    );
    let warm_parent = runner.warm_pool().parent_pid("benign").await;
    assert_eq!(warm_parent.is_some(), mode == Isolation::Fork);
    let test_name = test.dir.file_name().expect("name").to_string_lossy();
    for (pid, cgroup, cmdline) in &procs {
        assert_ne!(*pid, std::process::id() as i32, "the daemon is in {name}");
        assert_ne!(Some(*pid), warm_parent, "the warm parent is in {name}");
        assert!(
            cgroup.ends_with(&format!("/{test_name}/{name}")),
            "{pid} says it is in {cgroup:?}"
        );
        // The job's interpreter: it runs the worker's module.
        assert!(cmdline.contains("benign"), "{pid} runs {cmdline:?}");
    }
    let next_spare = spare_cgroup(&test, mode).await;
    assert!(
        spare.is_none() || next_spare != spare,
        "the job took over the spare's cgroup, and a new spare has its own"
    );
}

/// After a job: no job cgroup in spawn mode; in fork mode exactly one, the spare child's, which
/// holds that one process once the spare (forked after the job started) has entered it.
async fn spare_cgroup(test: &TestCgroup, mode: Isolation) -> Option<String> {
    // A finished job's cgroup is removed in the background, once empty.
    let expected = usize::from(mode == Isolation::Fork);
    wait_for(
        Duration::from_secs(5),
        "the finished job's cgroup to go",
        || job_cgroups(test).len() <= expected,
    )
    .await;
    let left = job_cgroups(test);
    if mode == Isolation::Spawn {
        assert_eq!(left, Vec::<String>::new(), "left after a job");
        return None;
    }
    assert_eq!(
        left.len(),
        1,
        "only the spare child's cgroup is left: {left:?}"
    );
    let dir = test.dir.join(&left[0]);
    wait_for(
        Duration::from_secs(5),
        "the spare child in its cgroup",
        || !TestCgroup::procs(&dir).is_empty(),
    )
    .await;
    let procs = TestCgroup::procs(&dir);
    assert_eq!(
        procs.len(),
        1,
        "the spare alone is in {}: {procs:?}",
        left[0]
    );
    left.into_iter().next()
}

/// The command line of a process, its arguments separated by spaces.
fn cmdline_of(pid: i32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

/// `job-<pid>-<start>` of a running process.
fn owner_of_process(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let start = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .expect("start time");
    format!("{pid}-{start}")
}

fn sleeper_in(cgroup: &Path) -> std::process::Child {
    let child = Command::new("sleep").arg("600").spawn().expect("sleep");
    std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).expect("move the sleeper");
    child
}

#[test]
fn cgroups_left_by_a_daemon_that_is_gone_are_killed_and_removed() {
    use std::os::unix::process::ExitStatusExt;
    let Some(base) = cgroup_base("cgroups_left_by_a_daemon_that_is_gone_are_killed_and_removed")
    else {
        return;
    };
    let test = TestCgroup::new(&base);
    // This process's pid with another start time: the daemon that had the pid before.
    let own = owner_tag().expect("tag");
    let (pid, start) = own.split_once('-').expect("pid-start");
    let start: u64 = start.parse().expect("start");
    let stale = test.dir.join(format!("job-{pid}-{}-7", start + 1));
    std::fs::create_dir(&stale).expect("stale");
    // With a process in a cgroup the job made inside its own.
    std::fs::create_dir(stale.join("inner")).expect("inner");
    let mut stray = sleeper_in(&stale.join("inner"));
    // A live daemon's job cgroup, and a folder that is no job's, stay.
    let mut other = Command::new("sleep").arg("600").spawn().expect("sleep");
    let live = test
        .dir
        .join(format!("job-{}-3", owner_of_process(other.id())));
    std::fs::create_dir(&live).expect("live");
    let unrelated = test.dir.join("unrelated");
    std::fs::create_dir(&unrelated).expect("unrelated");

    let sandbox = Sandbox::new(SandboxSettings {
        cgroup: CgroupSetting::Path(test.dir.clone()),
        ..SandboxSettings::default()
    });
    let status = stray.wait().expect("wait");
    let _ = other.kill();
    let _ = other.wait();
    sandbox.expect("the test cgroup is usable");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(!stale.exists(), "{} is still there", stale.display());
    assert!(live.exists(), "a live daemon's job cgroup was removed");
    assert!(unrelated.exists(), "a folder that is no job's was removed");
}

/// The hostile-worker fixtures' `benign` alone in a folder `nobody` can read, as the workers
/// folder of a command.
fn benign_only() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    hostile_worker("benign");
    let dir = tempfile::Builder::new()
        .prefix("cgroup-workers-")
        .tempdir_in(hostile_home())
        .expect("tmp");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let to = dir.path().join("benign");
    std::fs::create_dir(&to).expect("mkdir");
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for entry in std::fs::read_dir(hostile_home().join("workers/benign")).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
    dir
}

/// `hybrid-worker ARGS` with `sandbox.cgroup` = auto, started inside `cgroup` when given.
fn hybrid_in(cgroup: Option<&Path>, prefix: &[&str], args: &[&str], workers: &Path) -> Output {
    let venvs = hostile_home().join("venvs");
    let python = sandbox_interpreter().path.clone();
    let mut command = Command::new("sh");
    // The shell enters the cgroup (`0` is the writer), then becomes the command.
    let enter = match cgroup {
        Some(dir) => format!("echo 0 > '{}/cgroup.procs' && ", dir.display()),
        None => String::new(),
    };
    command
        .arg("-c")
        .arg(format!("{enter}exec \"$@\""))
        .arg("sh")
        .args(prefix)
        .arg(env!("CARGO_BIN_EXE_hybrid-worker"))
        .args(args)
        .args(["--workers-dir", &workers.display().to_string()])
        .current_dir(workers)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HYBRID__WORKERS__VENV_ROOT", venvs)
        .env("HYBRID__WORKERS__PYTHON", python)
        .env("HYBRID__ENGINE__TEMP_DIR", workers)
        .env("HYBRID__LOG__FORMAT", "text");
    command.output().expect("run hybrid-worker")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `sandbox NAME` line of `workers verify` output.
fn verify_line<'a>(stdout: &'a str, mechanism: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.contains(&format!("sandbox {mechanism:<14} ")))
        .unwrap_or_else(|| panic!("no {mechanism} line in:\n{stdout}"))
}

#[test]
fn a_daemon_alone_in_its_cgroup_moves_into_a_leaf_and_runs_jobs_beside_it() {
    let Some(base) =
        cgroup_base("a_daemon_alone_in_its_cgroup_moves_into_a_leaf_and_runs_jobs_beside_it")
    else {
        return;
    };
    let test = TestCgroup::new(&base);
    let workers = benign_only();
    let input = workers.path().join("input.json");
    std::fs::write(&input, r#"{"n": 1}"#).expect("input");
    let out = hybrid_in(
        Some(&test.dir),
        &[],
        &["exec", "benign", "--input", &input.display().to_string()],
        workers.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let leaf = test.dir.join("daemon");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("moved itself into a leaf cgroup"),
        "{}",
        text(&out)
    );
    // Its job ran in a sibling of the leaf, which is gone; the leaf stays for the next start.
    assert_eq!(test.children(), vec!["daemon".to_owned()]);
    assert_eq!(TestCgroup::procs(&leaf), Vec::<i32>::new());

    // A second start, in the leaf (as `kubectl exec` lands in the container's init cgroup):
    // the leaf's parent is still the folder of job cgroups.
    let out = hybrid_in(Some(&leaf), &[], &["workers", "verify"], workers.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = verify_line(&stdout, "cgroup");
    assert!(
        line.contains(&format!(" on  {}/job-*: placement", test.dir.display()))
            && line.contains(&format!("the daemon itself is in {}", leaf.display())),
        "{line}"
    );
}

#[test]
fn a_daemon_beside_other_processes_stays_and_says_why_it_cannot_have_controllers() {
    let Some(base) = cgroup_base(
        "a_daemon_beside_other_processes_stays_and_says_why_it_cannot_have_controllers",
    ) else {
        return;
    };
    let test = TestCgroup::new(&base);
    let mut neighbour = sleeper_in(&test.dir);
    let workers = benign_only();
    let out = hybrid_in(Some(&test.dir), &[], &["workers", "verify"], workers.path());
    let _ = neighbour.kill();
    let _ = neighbour.wait();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !test.dir.join("daemon").exists(),
        "the daemon moved although its cgroup had another process"
    );
    // Job cgroups still hold and kill the jobs; the controllers could not be given to them (on
    // a host without memory in this hierarchy, that is the first reason given).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = verify_line(&stdout, "cgroup");
    assert!(
        line.contains(" on  ") && !line.contains("daemon itself"),
        "{line}"
    );
    let memory = verify_line(&stdout, "cgroup memory");
    assert!(
        memory.contains("OFF")
            && (memory.contains("holds other processes than the daemon")
                || memory.contains("controller not available")),
        "{memory}"
    );
}

#[test]
fn a_daemon_that_may_not_write_its_cgroup_reports_cgroup_off() {
    let Some(base) = cgroup_base("a_daemon_that_may_not_write_its_cgroup_reports_cgroup_off")
    else {
        return;
    };
    // As nobody, in this (root's) cgroup.
    let workers = benign_only();
    let out = hybrid_in(
        None,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        &["workers", "verify"],
        workers.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = verify_line(&stdout, "cgroup");
    assert!(
        line.contains(&format!(
            "OFF {} is not writable by uid 65534",
            base.display()
        )),
        "{line}"
    );
    for part in ["cgroup memory", "cgroup pids"] {
        assert!(verify_line(&stdout, part).contains("OFF no job cgroups"));
    }
}

crate::in_both_modes!(a_job_runs_in_a_cgroup_of_its_own_that_is_gone_after_it);

/// A job started inside its cgroup by `clone3(CLONE_INTO_CGROUP)` whose program cannot run is
/// an error naming why (not a hang, not a process left behind), and a runnable one is in the
/// cgroup from its first instruction: its own `/proc/self/cgroup` says so.
#[tokio::test]
async fn a_child_started_inside_its_cgroup_reports_a_failed_exec_and_runs_inside() {
    use hybrid_worker::runner::child::{self, ChildSpec};
    use hybrid_worker::sandbox::Mechanisms;
    use std::os::fd::AsFd;

    let Some(base) = cgroup_base("a_child_started_inside_its_cgroup_reports_a_failed_exec") else {
        return;
    };
    let test = TestCgroup::new(&base);
    let job = test.dir.join("job-clone3");
    std::fs::create_dir(&job).expect("job cgroup");
    let temp = tempfile::tempdir().expect("tmp");
    let ready = hostile_worker("benign");
    let policy = Sandbox::new(SandboxSettings::default())
        .expect("sandbox")
        .with_mechanisms(Mechanisms::NONE)
        .policy(&ready.worker, &ready.python, temp.path(), temp.path());
    let prepared = policy.prepare(temp.path()).expect("prepared");
    let dir = std::fs::File::open(&job).expect("open the cgroup");
    let spec = |program: &Path, args: Vec<String>| ChildSpec {
        program: program.to_path_buf(),
        args,
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: temp.path().to_path_buf(),
    };

    let missing = spec(Path::new("/nonexistent/python3"), Vec::new());
    match child::spawn_in_cgroup(&missing, &prepared, dir.as_fd()) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
        Ok(Some(_)) => panic!("a missing program started"),
        Ok(None) => panic!("this kernel has CLONE_INTO_CGROUP; the test needs it"),
    }
    assert_eq!(
        TestCgroup::procs(&job),
        Vec::<i32>::new(),
        "left in the cgroup"
    );

    let cat = spec(Path::new("/bin/cat"), vec!["/proc/self/cgroup".into()]);
    let (handle, pipes) = child::spawn_in_cgroup(&cat, &prepared, dir.as_fd())
        .expect("spawn")
        .expect("clone3 with CLONE_INTO_CGROUP");
    let exit = tokio::task::spawn_blocking(move || handle.wait_blocking())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(exit.code, Some(0));
    let mut text = String::new();
    use std::io::Read;
    std::fs::File::from(pipes.stdout)
        .read_to_string(&mut text)
        .expect("stdout");
    let name = test
        .dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        text.trim_end().ends_with(&format!("/{name}/job-clone3")),
        "the child says it is in {text:?}"
    );
}
