//! The binary as users run it: exit codes, messages, and `exec` on the shipped examples.

use std::process::{Command, Output};

use serde_json::Value;

use crate::helpers::{
    hostile_home, hostile_worker, ready_worker, sandbox_interpreter, venv_root, workers_dir,
};

fn hybrid(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hybrid-worker"));
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HYBRID__WORKERS__VENV_ROOT", venv_root())
        .env("HYBRID__LOG__FORMAT", "text")
        .env_remove("HYBRID_CONFIG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run hybrid-worker")
}

fn result_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not a result ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn example(worker: &str, name: &str) -> String {
    workers_dir()
        .join(worker)
        .join("examples")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn exec_runs_every_example_of_the_data_workers() {
    for worker in ["csv-normalize", "join-sources"] {
        ready_worker(worker);
        let dir = workers_dir().join(worker).join("examples");
        for entry in std::fs::read_dir(dir).expect("examples") {
            let path = entry.expect("entry").path();
            let out = hybrid(
                &["exec", worker, "--input", &path.display().to_string()],
                &[],
            );
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let result = result_of(&out);
            assert_eq!(result["status"], "succeeded");
            assert_eq!(result["worker"], worker);
        }
    }
}

#[test]
fn exec_exit_codes_follow_the_outcome() {
    ready_worker("diagnostics");
    let cases = [
        ("echo.json", 0, None),
        ("fail.json", 1, Some("HandlerError")),
        ("invalid.json", 1, Some("InvalidInput")),
        ("signal.json", 1, Some("Crashed")),
        ("exit.json", 1, Some("Crashed")),
    ];
    for (file, code, kind) in cases {
        let out = hybrid(
            &[
                "exec",
                "diagnostics",
                "--input",
                &example("diagnostics", file),
            ],
            &[],
        );
        assert_eq!(
            out.status.code(),
            Some(code),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result = result_of(&out);
        match kind {
            None => assert_eq!(result["error"], Value::Null),
            Some(kind) => assert_eq!(result["error"]["kind"], kind, "{file}"),
        }
    }
    let out = hybrid(
        &["exec", "diagnostics", "--input", "-", "--timeout", "0.5"],
        &[],
    );
    // No stdin: the input is empty, which is not JSON.
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn usage_and_configuration_errors_exit_2_with_a_reason() {
    let out = hybrid(&["exec", "no-such-worker"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("csv-normalize"),
        "names the workers there are"
    );

    let out = hybrid(&["exec", "diagnostics", "--input", "Cargo.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not JSON"));

    let out = hybrid(
        &["config", "show"],
        &[("HYBRID__ENGINE__CONCURRENCY", "lots")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("concurrency"));

    let out = hybrid(&["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_with_nothing_configured_and_embedded_never_exits_2_naming_the_settings() {
    // Ports 0: were the refusal missing, `run` would start (emulator and HTTP on free ports)
    // instead of exiting, and the timeout below would report it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_hybrid-worker"))
        .arg("run")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HYBRID__WORKERS__VENV_ROOT", venv_root())
        .env("HYBRID__LOG__FORMAT", "text")
        .env_remove("HYBRID_CONFIG")
        .env_remove("HYBRID__SERVICEBUS__CONNECTION_STRING")
        .env_remove("HYBRID__SERVICEBUS__NAMESPACE")
        .env("HYBRID__SERVICEBUS__EMBEDDED", "never")
        .env("HYBRID__EMULATOR__LISTEN", "127.0.0.1:0")
        .env("HYBRID__HTTP__LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start hybrid-worker run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "`run` kept running with nothing configured and embedded = never: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for name in [
        "servicebus.embedded",
        "servicebus.connection_string",
        "servicebus.namespace",
    ] {
        assert!(stderr.contains(name), "names {name}: {stderr}");
    }

    let out = hybrid(
        &["config", "show"],
        &[("HYBRID__SERVICEBUS__EMBEDDED", "sometimes")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("embedded"),
        "a bad value names the key"
    );
}

#[test]
fn a_missing_venv_is_refused_with_the_command_that_builds_it() {
    let empty = tempfile::tempdir().expect("tmp");
    let root = empty.path().display().to_string();
    let out = hybrid(
        &[
            "exec",
            "diagnostics",
            "--input",
            &example("diagnostics", "echo.json"),
        ],
        &[("HYBRID__WORKERS__VENV_ROOT", &root)],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hybrid-worker workers build diagnostics"),
        "{stderr}"
    );

    let out = hybrid(
        &["workers", "verify"],
        &[("HYBRID__WORKERS__VENV_ROOT", &root)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("missing"));
}

#[test]
fn config_show_prints_the_effective_config_without_secrets() {
    let out = hybrid(
        &["config", "show"],
        &[
            (
                "HYBRID__SERVICEBUS__CONNECTION_STRING",
                "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=TOPSECRET",
            ),
            ("HYBRID__QUEUES__JOBS", "other-jobs"),
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("other-jobs"));
    assert!(!text.contains("TOPSECRET"));
}

#[test]
fn workers_verify_shows_what_the_sandbox_enforces_and_how() {
    for name in ["benign", "net-connect"] {
        hostile_worker(name);
    }
    let home = hostile_home();
    let only = tempfile::tempdir().expect("tmp");
    // Just two workers, so that verify finds every venv it lists.
    for name in ["benign", "net-connect"] {
        let to = only.path().join(name);
        std::fs::create_dir(&to).expect("mkdir");
        for entry in std::fs::read_dir(home.join("workers").join(name)).expect("fixture") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
    let venvs = home.join("venvs").display().to_string();
    let python = sandbox_interpreter().path.display().to_string();
    let out = hybrid(
        &[
            "workers",
            "verify",
            "--workers-dir",
            &only.path().display().to_string(),
        ],
        &[
            ("HYBRID__WORKERS__VENV_ROOT", &venvs),
            ("HYBRID__WORKERS__PYTHON", &python),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mechanism in [
        "user",
        "rlimits",
        "processes",
        "oom_score_adj",
        "no_new_privs",
        "seccomp",
        "landlock",
        "cgroup",
        "cgroup memory",
        "cgroup pids",
    ] {
        // As `workers verify` pads the names.
        let lines = text
            .lines()
            .filter(|l| l.contains(&format!("sandbox {mechanism:<14} ")))
            .count();
        assert_eq!(lines, 2, "{mechanism} once per worker:\n{text}");
    }
    assert!(text.contains("sockets: AF_UNIX only"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("sandbox landlock") && l.contains(" on ") && l.contains("ABI ")),
        "{text}"
    );
}

/// A daemon that is not root (as on AKS) must run jobs: its child is briefly non-dumpable
/// after the fork and must still set up its sandbox. As root, the command runs as `nobody`.
#[test]
fn a_non_root_daemon_runs_jobs() {
    let benign = crate::helpers::hostile_worker("benign");
    let home = crate::helpers::hostile_home();
    let temp = home.join("tmp-non-root");
    std::fs::create_dir_all(&temp).expect("mkdir");
    std::fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
        .expect("chmod");
    let python = crate::helpers::sandbox_interpreter()
        .path
        .display()
        .to_string();
    let venvs = home.join("venvs").display().to_string();
    let workers = home.join("workers").display().to_string();
    let mut cmd = if nix::unistd::getuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        c.arg(env!("CARGO_BIN_EXE_hybrid-worker"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_hybrid-worker"))
    };
    let input = temp.join("input.json");
    std::fs::write(&input, "{}").expect("input");
    let input = input.display().to_string();
    let out = cmd
        .args([
            "exec",
            &benign.worker.name,
            "--workers-dir",
            &workers,
            "--input",
            &input,
        ])
        .current_dir(&temp)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HYBRID__WORKERS__VENV_ROOT", &venvs)
        .env("HYBRID__WORKERS__PYTHON", &python)
        .env("HYBRID__ENGINE__TEMP_DIR", temp.display().to_string())
        .env("HYBRID__LOG__FORMAT", "text")
        .output()
        .expect("run hybrid-worker");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(result_of(&out)["status"], "succeeded");
}

#[test]
fn sandbox_require_refuses_to_start_when_a_required_mechanism_is_off() {
    ready_worker("diagnostics");
    let echo = example("diagnostics", "echo.json");
    // Job cgroups turned off, and required: nothing runs, and the message says which and why.
    let out = hybrid(
        &["exec", "diagnostics", "--input", &echo],
        &[
            ("HYBRID__SANDBOX__CGROUP", "off"),
            ("HYBRID__SANDBOX__REQUIRE", "seccomp,cgroup"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("sandbox.require") && stderr.contains("worker \"diagnostics\": cgroup:"),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "a job ran: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // What is on everywhere may be required: the job runs.
    let out = hybrid(
        &["exec", "diagnostics", "--input", &echo],
        &[(
            "HYBRID__SANDBOX__REQUIRE",
            "rlimits,oom_score_adj,no_new_privs",
        )],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An unknown name is a configuration error.
    let out = hybrid(
        &["config", "show"],
        &[("HYBRID__SANDBOX__REQUIRE", "seccomp,firewall")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("sandbox.require") && stderr.contains("firewall"),
        "{stderr}"
    );
}

#[test]
fn a_root_daemon_without_the_capabilities_to_drop_and_stop_jobs_refuses_to_start() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    ready_worker("diagnostics");
    let echo = example("diagnostics", "echo.json");
    // uid 0 without CAP_KILL (as in a container or user namespace that grants uid 0 but not
    // every capability): jobs of another uid could not be stopped at their deadline.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set=-kill", "--"])
        .arg(env!("CARGO_BIN_EXE_hybrid-worker"))
        .args(["exec", "diagnostics", "--input", &echo])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HYBRID__WORKERS__VENV_ROOT", venv_root())
        .env("HYBRID__LOG__FORMAT", "text")
        .env_remove("HYBRID_CONFIG");
    let out = cmd.output().expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("CAP_KILL") && stderr.contains("never runs as uid 0"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "a job ran");
}

#[test]
fn run_refuses_a_concurrency_its_open_files_limit_cannot_hold() {
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 512 && exec \"$0\" run")
        .arg(env!("CARGO_BIN_EXE_hybrid-worker"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HYBRID__ENGINE__CONCURRENCY", "100")
        .env("HYBRID__HTTP__LISTEN", "127.0.0.1:0")
        .env("HYBRID__EMULATOR__LISTEN", "127.0.0.1:0")
        .env("HYBRID__LOG__FORMAT", "text")
        .env_remove("HYBRID_CONFIG")
        .output()
        .expect("run hybrid-worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("engine.concurrency = 100") && stderr.contains("only 512"),
        "{stderr}"
    );
}

#[test]
fn the_emulator_key_is_configured_and_never_shown() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_hybrid-worker"))
        .args(["emulator", "--listen", "127.0.0.1:0", "--in-memory"])
        .env("HYBRID__EMULATOR__KEY", "my-own-key")
        .env_remove("HYBRID_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the emulator");
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        BufReader::new(stdout).read_line(&mut line).expect("read");
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains(";SharedAccessKey=my-own-key;"), "{line}");

    let out = hybrid(
        &["config", "show"],
        &[("HYBRID__EMULATOR__KEY", "my-own-key")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("my-own-key"), "{text}");
}
