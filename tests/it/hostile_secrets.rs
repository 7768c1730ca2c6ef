//! Hostile workers against the daemon's secrets, scrubbing and tokens (docs/secrets.md): a job
//! that prints, logs, returns and raises its secret has each copy scrubbed; one reading the
//! secrets folder itself is refused by its sandbox; an undeclared secret or scope is
//! `PolicyDenied`; a rotated secret is the next job's; a job flooding token requests stalls
//! only itself. Every case runs in both isolation modes.
//!
//! Its jobs run as uid 230000, apart from the other suites' uids, one test at a time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use hybrid_worker::job::ErrorKind;
use hybrid_worker::runner::output::LogRecord;
use hybrid_worker::runner::{RunOutcome, RunReport, RunRequest, Runner};
use hybrid_worker::sandbox::SandboxSettings;
use hybrid_worker::secrets::Governance;
use hybrid_worker::secrets::tokens::TokenBroker;
use hybrid_worker::worker::Isolation;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// Quotes, a backslash and non-ASCII: its JSON forms differ from the raw value.
const SECRET: &str = "s3cr3t-\"quoted\"\\-wört-230k";
const REDACTED: &str = "[redacted:api-key]";
const STORAGE: &str = "https://storage.azure.com/.default";
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const T: Duration = Duration::from_secs(20);

/// A local token issuer standing in for Entra ID: counts its calls; tokens live an hour.
#[derive(Debug, Default)]
struct Issuer(AtomicUsize);

#[async_trait::async_trait]
impl TokenCredential for Issuer {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        let expires = azure_core::time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
        Ok(AccessToken::new(
            format!("local-token-{n}-{}", scopes.join(",")),
            expires,
        ))
    }
}

/// One daemon: its runner, its secrets folder (open to every user: only the sandbox keeps
/// jobs out) and its token issuer.
struct Daemon {
    runner: Runner,
    mode: Isolation,
    secrets: tempfile::TempDir,
    issuer: Arc<Issuer>,
    _temp: tempfile::TempDir,
}

impl Daemon {
    fn new(mode: Isolation) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let temp = tempfile::tempdir().expect("tmp");
        let secrets = tempfile::tempdir().expect("tmp");
        std::fs::set_permissions(secrets.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let file = secrets.path().join("api-key");
        std::fs::write(&file, format!("{SECRET}\n")).expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let settings = SandboxSettings {
            user: 230_000,
            group: 65534,
            ..SandboxSettings::default()
        };
        let issuer = Arc::new(Issuer::default());
        let runner = sandboxed_runner_with(temp.path(), settings).with_governance(Governance {
            secrets_dir: Some(secrets.path().to_path_buf()),
            tokens: Some(Arc::new(TokenBroker::new(issuer.clone()))),
        });
        Self {
            runner,
            mode,
            secrets,
            issuer,
            _temp: temp,
        }
    }

    async fn run(&self, worker: &str, input: Value) -> (RunReport, Vec<LogRecord>) {
        let ready = in_mode(hostile_worker(worker), self.mode);
        let request = RunRequest {
            worker: &ready.worker,
            python: ready.python.clone(),
            job_id: "hostile-secrets-1",
            attempt: 1,
            correlation_id: None,
            input: &input,
            timeout: T,
            extra_env: Vec::new(),
        };
        let logs = std::sync::Mutex::new(Vec::new());
        let on_log = |r: LogRecord| logs.lock().expect("lock").push(r);
        let report = self
            .runner
            .run(request, CancellationToken::new(), &on_log)
            .await;
        (report, logs.into_inner().expect("lock"))
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

fn failure(report: &RunReport) -> (ErrorKind, String) {
    match &report.outcome {
        RunOutcome::Failed(e) => (e.kind, e.message.clone()),
        other => panic!(
            "expected a failure, got {other:?} (stderr: {})",
            report.stderr.text()
        ),
    }
}

/// No form of the secret, and no six-byte beginning of it, anywhere in `text`.
fn assert_clean(what: &str, text: &str) {
    let escaped = serde_json::to_string(SECRET).expect("json");
    for form in [SECRET, escaped.trim_matches('"'), &SECRET[..6]] {
        assert!(!text.contains(form), "{what} holds the secret: {text}");
    }
}

async fn printing_logging_and_returning_the_secret_is_scrubbed(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let (report, logs) = daemon.run("secret-leaker", json!({"mode": "all"})).await;
    let out = output(&report);
    assert_clean("the result", &out.to_string());
    assert_eq!(out["plain"], REDACTED);
    assert_eq!(out[REDACTED], json!([REDACTED]));
    // json.dumps escaped the quotes and the ö: that form is caught too.
    assert_eq!(out["json"], format!("\"{REDACTED}\""));
    let stdout = report.stdout.text();
    assert_clean("stdout", &stdout);
    assert!(stdout.contains(&format!("stdout {REDACTED}")), "{stdout}");
    assert!(
        stdout.contains(&format!("{{\"secret\": \"{REDACTED}\"}}")),
        "{stdout}"
    );
    // The copy the cap cut six bytes in is replaced as well.
    assert!(report.stdout.truncated(), "{stdout}");
    assert!(stdout.contains(&format!("x{REDACTED}\n[...")), "{stdout}");
    let stderr = report.stderr.text();
    assert_clean("stderr", &stderr);
    assert!(stderr.contains(&format!("stderr {REDACTED}")), "{stderr}");
    let (raw, handler): (Vec<&LogRecord>, Vec<&LogRecord>) =
        logs.iter().partition(|r| r.msg == "raw");
    assert_eq!(handler.len(), 2, "{logs:?}");
    for record in handler {
        assert_clean("a log record", &record.msg);
        assert!(record.msg.contains(REDACTED), "{record:?}");
    }
    // The line the job wrote on its channel itself: every field is scrubbed.
    assert_eq!(raw.len(), 1, "{logs:?}");
    assert_eq!(
        (raw[0].level.as_str(), raw[0].logger.as_str()),
        (REDACTED, REDACTED)
    );
}

async fn raising_the_secret_is_scrubbed_from_the_error_and_traceback(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let (report, _) = daemon.run("secret-leaker", json!({"mode": "raise"})).await;
    let (kind, message) = failure(&report);
    assert_eq!(kind, ErrorKind::HandlerError);
    assert_eq!(
        message,
        format!("RuntimeError: cannot connect with {REDACTED}")
    );
    let stderr = report.stderr.text();
    assert_clean("the traceback", &stderr);
    assert!(stderr.contains("Traceback"), "{stderr}");
}

async fn reading_the_secrets_folder_directly_is_refused(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let path = daemon.secrets.path().join("api-key");
    let (report, _) = daemon.run("read-secret-file", json!({"path": path})).await;
    let (kind, message) = failure(&report);
    assert_eq!(kind, ErrorKind::HandlerError, "{message}");
    assert!(message.starts_with("PermissionError"), "{message}");
    assert_clean("stderr", &report.stderr.text());
}

async fn an_undeclared_secret_is_policy_denied(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let (report, _) = daemon
        .run("secret-leaker", json!({"mode": "undeclared"}))
        .await;
    let (kind, message) = failure(&report);
    assert_eq!(kind, ErrorKind::PolicyDenied, "{message}");
    assert!(
        message.starts_with("secret 'not-declared' is not declared"),
        "{message}"
    );
}

async fn a_missing_declared_secret_fails_the_job_with_policy_denied(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    std::fs::remove_file(daemon.secrets.path().join("api-key")).expect("rm");
    let (report, _) = daemon.run("secret-leaker", json!({"mode": "all"})).await;
    let (kind, message) = failure(&report);
    assert_eq!(kind, ErrorKind::PolicyDenied, "{message}");
    assert!(message.contains("secret \"api-key\""), "{message}");
    assert!(report.exit.is_none(), "no process was started");
}

async fn a_rotated_secret_is_the_next_jobs(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let (report, _) = daemon
        .run("secret-leaker", json!({"mode": "reversed"}))
        .await;
    let reversed: String = SECRET.chars().rev().collect();
    // A transformed value is not recognised (docs/secrets.md says so).
    assert_eq!(output(&report)["reversed"], reversed);
    std::fs::write(daemon.secrets.path().join("api-key"), "rotated-value").expect("write");
    let (report, _) = daemon
        .run("secret-leaker", json!({"mode": "reversed"}))
        .await;
    assert_eq!(output(&report)["reversed"], "eulav-detator");
}

async fn a_declared_scope_gets_a_cached_token_from_the_daemon(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let (report, _) = daemon.run("token-user", json!({"mode": "declared"})).await;
    let out = output(&report);
    use sha2::Digest;
    let expected = hex::encode(sha2::Sha256::digest(format!("local-token-0-{STORAGE}")));
    assert_eq!(out["sha256"], expected.as_str());
    assert_eq!(out["info_sha256"], expected.as_str());
    // A token handed to the job is scrubbed from what it sends back, like its secrets.
    assert_eq!(out["token"], "[redacted:token]");
    assert!(out["expires_on"].as_i64().expect("int") > 0);
    assert_eq!(out["expires_on"], out["info_expires_on"]);
    let (report, _) = daemon.run("token-user", json!({"mode": "declared"})).await;
    assert_eq!(output(&report)["sha256"], expected.as_str());
    // The asynchronous credential, from an executor thread of the job's event loop.
    let (report, _) = daemon.run("token-user", json!({"mode": "async"})).await;
    assert_eq!(output(&report)["sha256"], expected.as_str());
    assert_eq!(daemon.issuer.0.load(Ordering::SeqCst), 1, "cached");
}

async fn an_undeclared_scope_is_policy_denied(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let (report, _) = daemon
        .run("token-user", json!({"mode": "undeclared"}))
        .await;
    let (kind, message) = failure(&report);
    assert_eq!(kind, ErrorKind::PolicyDenied, "{message}");
    assert!(message.contains("vault.azure.net"), "{message}");
    // A worker declaring no scopes gets no token either.
    let (report, _) = daemon.run("secret-leaker", json!({"mode": "token"})).await;
    let (kind, message) = failure(&report);
    assert_eq!(kind, ErrorKind::PolicyDenied, "{message}");
    assert_eq!(daemon.issuer.0.load(Ordering::SeqCst), 0);
}

async fn flooding_token_requests_stalls_no_one_but_the_job(mode: Isolation) {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(mode);
    let started = std::time::Instant::now();
    let (report, _) = daemon
        .run("token-user", json!({"mode": "flood", "n": 5000}))
        .await;
    assert_eq!(output(&report)["flooded"], true);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let (report, _) = daemon.run("token-user", json!({"mode": "declared"})).await;
    assert_eq!(output(&report)["token"], "[redacted:token]");
}

crate::in_both_modes!(
    printing_logging_and_returning_the_secret_is_scrubbed,
    raising_the_secret_is_scrubbed_from_the_error_and_traceback,
    reading_the_secrets_folder_directly_is_refused,
    an_undeclared_secret_is_policy_denied,
    a_missing_declared_secret_fails_the_job_with_policy_denied,
    a_rotated_secret_is_the_next_jobs,
    a_declared_scope_gets_a_cached_token_from_the_daemon,
    an_undeclared_scope_is_policy_denied,
    flooding_token_requests_stalls_no_one_but_the_job,
);

/// A workers folder holding copies of the named fixtures (their venvs are built first).
fn fixtures_folder(names: &[&str]) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let only = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(only.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for name in names {
        hostile_worker(name);
        let to = only.path().join(name);
        std::fs::create_dir(&to).expect("mkdir");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for entry in std::fs::read_dir(hostile_home().join("workers").join(name)).expect("fixture")
        {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
    only
}

fn hybrid(args: &[&str], envs: &[(&str, String)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hybrid-worker"));
    cmd.args(args)
        .env_remove("HYBRID_CONFIG")
        .env("HYBRID__LOG__FORMAT", "text")
        .env(
            "HYBRID__WORKERS__VENV_ROOT",
            hostile_home().join("venvs").display().to_string(),
        )
        .env(
            "HYBRID__WORKERS__PYTHON",
            sandbox_interpreter().path.display().to_string(),
        )
        .env("HYBRID__SANDBOX__USER", "230000");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run hybrid-worker")
}

#[test]
fn workers_verify_shows_secrets_and_scopes_and_audits_the_folder() {
    use std::os::unix::fs::PermissionsExt;
    let workers = fixtures_folder(&["secret-leaker", "token-user"]);
    let dir = workers.path().display().to_string();
    let secrets = tempfile::tempdir().expect("tmp");
    std::fs::write(secrets.path().join("api-key"), SECRET).expect("write");
    std::fs::set_permissions(secrets.path(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    let verify = |secrets_dir: String| {
        let out = hybrid(
            &["workers", "verify", "--workers-dir", &dir],
            &[("HYBRID__SECRETS__DIR", secrets_dir)],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), text)
    };
    let (code, text) = verify(secrets.path().display().to_string());
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("secrets             api-key (from "),
        "{text}"
    );
    assert!(
        text.contains("azure_scopes        https://storage.azure.com/.default"),
        "{text}"
    );
    assert!(!text.contains(SECRET), "{text}");

    // No folder while a worker declares secrets: an error, naming the variable.
    let (code, text) = verify(String::new());
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("secrets ERROR") && text.contains("HYBRID__SECRETS__DIR"),
        "{text}"
    );

    // A folder inside the worker's own folder, which its jobs may read: an error.
    let inside = workers.path().join("secret-leaker").join("keys");
    std::fs::create_dir(&inside).expect("mkdir");
    std::fs::write(inside.join("api-key"), SECRET).expect("write");
    let (code, text) = verify(inside.display().to_string());
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("overlaps"), "{text}");
}

/// `exec WORKER` of a fixture with `{"mode": mode}`, its secrets folder holding `api-key`, the
/// daemon logging at debug: the exit code, stdout and stderr (the daemon's log).
fn exec_fixture(worker: &str, mode: &str) -> (Option<i32>, String, String) {
    exec_fixture_with(worker, mode, &[])
}

/// [`exec_fixture`] with more variables for the daemon.
fn exec_fixture_with(
    worker: &str,
    mode: &str,
    more: &[(&str, String)],
) -> (Option<i32>, String, String) {
    use std::os::unix::fs::PermissionsExt;
    let workers = fixtures_folder(&[worker]);
    let secrets = tempfile::tempdir().expect("tmp");
    std::fs::write(secrets.path().join("api-key"), SECRET).expect("write");
    let temp = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let input = temp.path().join("input.json");
    std::fs::write(&input, json!({"mode": mode}).to_string()).expect("input");
    let mut envs = vec![
        ("HYBRID__SECRETS__DIR", secrets.path().display().to_string()),
        (
            "HYBRID__ENGINE__TEMP_DIR",
            temp.path().display().to_string(),
        ),
        ("HYBRID__LOG__LEVEL", "debug".into()),
    ];
    envs.extend(more.iter().cloned());
    let out = hybrid(
        &[
            "exec",
            worker,
            "--workers-dir",
            &workers.path().display().to_string(),
            "--input",
            &input.display().to_string(),
        ],
        &envs,
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn exec_hands_a_job_its_secret_and_scrubs_the_result_and_the_daemons_log() {
    let (code, stdout, stderr) = exec_fixture("secret-leaker", "all");
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let result: Value = serde_json::from_str(&stdout).expect("a result");
    assert_eq!(result["output"]["plain"], REDACTED, "{stdout}");
    assert_clean("exec's stdout", &stdout);
    assert_clean("the daemon's log", &stderr);
    assert!(stderr.contains(REDACTED), "the job's log lines: {stderr}");
}

#[test]
fn a_secret_asked_for_as_a_scope_stays_out_of_the_daemons_log() {
    let (code, stdout, stderr) = exec_fixture("token-user", "secret-as-scope");
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    let result: Value = serde_json::from_str(&stdout).expect("a result");
    assert_eq!(result["error"]["kind"], "PolicyDenied", "{stdout}");
    assert_clean("exec's stdout", &stdout);
    assert_clean("the daemon's log", &stderr);
    assert!(
        stderr.contains("Refused a job a token") && stderr.contains(REDACTED),
        "{stderr}"
    );
}

#[test]
fn exec_refuses_to_start_when_jobs_could_read_the_secrets_folder() {
    let workers = fixtures_folder(&["secret-leaker"]);
    // Inside the worker's own folder, which its jobs may read.
    let inside = workers.path().join("secret-leaker").join("keys");
    std::fs::create_dir(&inside).expect("mkdir");
    std::fs::write(inside.join("api-key"), SECRET).expect("write");
    let input = workers.path().join("input.json");
    std::fs::write(&input, r#"{"mode": "all"}"#).expect("input");
    let out = hybrid(
        &[
            "exec",
            "secret-leaker",
            "--workers-dir",
            &workers.path().display().to_string(),
            "--input",
            &input.display().to_string(),
        ],
        &[("HYBRID__SECRETS__DIR", inside.display().to_string())],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("jobs could read the secrets folder") && stderr.contains("overlaps"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "a job ran");
}

/// Whether `needle` is anywhere in the readable memory of process `pid` (read as root through
/// `/proc/<pid>/mem`).
fn memory_holds(pid: i32, needle: &[u8]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (start, end) = (
            u64::from_str_radix(start, 16).expect("hex"),
            u64::from_str_radix(end, 16).expect("hex"),
        );
        let mut region = vec![0u8; usize::try_from(end - start).expect("size")];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue;
        }
        if region.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn the_warm_parent_never_holds_a_jobs_secret() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::new(Isolation::Fork);
    for _ in 0..2 {
        let (report, _) = daemon
            .run("secret-leaker", json!({"mode": "reversed"}))
            .await;
        let reversed: String = SECRET.chars().rev().collect();
        assert_eq!(output(&report)["reversed"], reversed);
    }
    let pid = daemon
        .runner
        .warm_pool()
        .parent_pid("secret-leaker")
        .await
        .expect("the warm parent runs");
    // The scan finds what is there: this test's own memory holds the constant, and the
    // parent's its handler's source name.
    assert!(memory_holds(
        i32::try_from(std::process::id()).expect("pid"),
        SECRET.as_bytes()
    ));
    assert!(memory_holds(pid, b"secret_leaker.py"));
    assert!(
        !memory_holds(pid, SECRET.as_bytes()),
        "the warm parent {pid} holds a job's secret"
    );
}

/// A local managed-identity endpoint (the App Service protocol `azure_identity` speaks when
/// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` are set) on 127.0.0.1: answers every request with
/// `token`, valid an hour, and keeps each request's head.
fn local_token_issuer(token: &'static str) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let url = format!("http://{}/msi/token", listener.local_addr().expect("addr"));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut head = String::new();
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            log.lock().expect("lock").push(head);
            let expires = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("time")
                .as_secs()
                + 3600;
            let body = json!({"access_token": token, "expires_on": expires.to_string(),
                              "token_type": "Bearer", "resource": "https://storage.azure.com"})
            .to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

#[test]
fn exec_gets_a_jobs_token_with_the_daemons_own_credential_from_a_local_issuer() {
    const TOKEN: &str = "local-managed-identity-token-230k";
    let (url, seen) = local_token_issuer(TOKEN);
    let (code, stdout, stderr) = exec_fixture_with(
        "token-user",
        "declared",
        &[
            ("HYBRID__SERVICEBUS__CREDENTIAL", "managed".into()),
            ("IDENTITY_ENDPOINT", url),
            ("IDENTITY_HEADER", "local-identity-header".into()),
        ],
    );
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let result: Value = serde_json::from_str(&stdout).expect("a result");
    use sha2::Digest;
    let expected = hex::encode(sha2::Sha256::digest(TOKEN));
    assert_eq!(result["output"]["sha256"], expected.as_str(), "{stdout}");
    assert_eq!(result["output"]["info_sha256"], expected.as_str());
    assert_eq!(result["output"]["token"], "[redacted:token]");
    // Two asks of the job, one request to the issuer: the second came from the cache.
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let head = seen[0].to_ascii_lowercase();
    assert!(
        head.contains("resource=https%3a%2f%2fstorage.azure.com")
            && head.contains("x-identity-header: local-identity-header"),
        "{head}"
    );
    // The log's text form colours its fields: compare without the escapes.
    let plain = stderr.replace("\u{1b}[2m", "").replace("\u{1b}[0m", "");
    let issued: Vec<&str> = plain
        .lines()
        .filter(|l| l.contains("Issued an Entra ID token to a job."))
        .collect();
    assert_eq!(issued.len(), 2, "{plain}");
    assert!(issued[0].contains("cached=false") && issued[1].contains("cached=true"));
    assert!(issued.iter().all(|l| l.contains("worker=token-user")
        && l.contains("scope=https://storage.azure.com/.default")
        && l.contains("job_id=exec-")));
    assert!(
        !stderr.contains(TOKEN) && !stdout.contains(TOKEN),
        "{stderr}"
    );
}
