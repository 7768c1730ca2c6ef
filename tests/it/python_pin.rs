//! A worker pinned to an interpreter (`python = "3.12"` in `worker.toml`) runs on that
//! interpreter, found on the host the way the daemon finds it (uv, pyenv, PATH); a pin nothing
//! satisfies is refused with the command that installs a match.
//!
//! These tests need Python 3.12 on the host (CI here has it under pyenv). Where it is missing
//! they fail, unless `HYBRID_TEST_REQUIRE_PYTHONS=0` says the host is not expected to have it.

use std::path::Path;
use std::process::{Command, Output};

use hybrid_worker::worker::pin::{Places, PythonRequirement};
use serde_json::Value;

use crate::helpers::system_dir;

fn hybrid(args: &[&str], venvs: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hybrid-worker"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HYBRID__WORKERS__VENV_ROOT", venvs)
        .env("HYBRID__WORKERS__SYSTEM_DIR", system_dir())
        .env("HYBRID__LOG__FORMAT", "text")
        .env_remove("HYBRID_CONFIG")
        .output()
        .expect("run hybrid-worker")
}

/// A worker whose job answers with the interpreter it runs on.
fn version_worker(root: &Path, name: &str, pin: &str) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("worker.toml"),
        format!("entrypoint = \"ver:run\"\npython = \"{pin}\"\n"),
    )
    .expect("toml");
    std::fs::write(dir.join("requirements.txt"), "").expect("reqs");
    std::fs::write(
        dir.join("ver.py"),
        "import sys\n\ndef run(input, ctx):\n    return {\"version\": sys.version, \"executable\": sys.executable}\n",
    )
    .expect("handler");
}

/// Whether the host has an interpreter for `pin`; when it has none, panics unless
/// `HYBRID_TEST_REQUIRE_PYTHONS=0`.
fn host_has(pin: &str) -> bool {
    let requirement = PythonRequirement::try_from(pin.to_owned()).expect("pin");
    match Places::from_env().find(&requirement) {
        Ok(_) => true,
        Err(e) if std::env::var("HYBRID_TEST_REQUIRE_PYTHONS").as_deref() == Ok("0") => {
            eprintln!("skipped: {e} (HYBRID_TEST_REQUIRE_PYTHONS=0)");
            false
        }
        Err(e) => panic!("{e} (set HYBRID_TEST_REQUIRE_PYTHONS=0 on a host without it)"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_worker_pinned_to_3_12_runs_its_jobs_on_3_12() {
    if !host_has("3.12") {
        return;
    }
    let workers = tempfile::tempdir().expect("tmp");
    let venvs = tempfile::tempdir().expect("tmp");
    version_worker(workers.path(), "on312", "3.12");
    let dir = workers.path().display().to_string();

    let out = hybrid(&["workers", "build", "--workers-dir", &dir], venvs.path());
    assert!(out.status.success(), "{}", text(&out));
    let lock_path = std::fs::read_dir(venvs.path())
        .expect("venvs")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("hybrid-worker.lock.json"))
        .find(|p| p.is_file())
        .expect("a lock");
    let lock: Value =
        serde_json::from_slice(&std::fs::read(&lock_path).expect("lock")).expect("json");
    assert!(
        lock["python_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.12.")),
        "{lock}"
    );
    assert_eq!(lock["python_requirement"], "3.12", "{lock}");
    assert!(
        lock["python_path"].as_str().is_some_and(|p| !p.is_empty()),
        "{lock}"
    );

    let input = workers.path().join("input.json");
    std::fs::write(&input, "{}").expect("input");
    let out = hybrid(
        &[
            "exec",
            "on312",
            "--workers-dir",
            &dir,
            "--input",
            &input.display().to_string(),
        ],
        venvs.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let result: Value = serde_json::from_slice(&out.stdout).expect("result");
    let version = result["output"]["version"].as_str().unwrap_or_default();
    assert!(
        version.starts_with("3.12."),
        "the job ran on {version:?}: {result}"
    );

    let out = hybrid(&["workers", "verify", "--workers-dir", &dir], venvs.path());
    let shown = text(&out);
    assert!(
        shown.contains("python 3.12.") && shown.contains("pinned by python = \"3.12\""),
        "{shown}"
    );
}

#[test]
fn a_pin_nothing_satisfies_is_refused_with_the_install_command() {
    let workers = tempfile::tempdir().expect("tmp");
    let venvs = tempfile::tempdir().expect("tmp");
    version_worker(workers.path(), "on399", "3.99");
    let dir = workers.path().display().to_string();

    let out = hybrid(&["workers", "verify", "--workers-dir", &dir], venvs.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains("no-python") && shown.contains("install 3.99"),
        "{shown}"
    );

    let input = workers.path().join("input.json");
    std::fs::write(&input, "{}").expect("input");
    let out = hybrid(
        &[
            "exec",
            "on399",
            "--workers-dir",
            &dir,
            "--input",
            &input.display().to_string(),
        ],
        venvs.path(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains("worker \"on399\"")
            && shown.contains("python = \"3.99\"")
            && shown.contains("install 3.99"),
        "{shown}"
    );
}
