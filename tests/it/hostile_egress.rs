//! Hostile egress: a worker whose `network` lists one local server reaches it through the
//! daemon's egress proxy, and nothing else — not that server around the proxy, not another
//! server through the proxy or around it, not over UDP or IPv6 (`docs/egress.md`). Every case
//! runs in both isolation modes.
//!
//! The jobs run as uid 220_000, a range of this file's own (the hostile suite uses 210_000 and
//! 200_000), and the tests run one at a time: they compare the proxy's counters before and
//! after.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hybrid_worker::runner::{RunOutcome, RunRequest, Runner};
use hybrid_worker::sandbox::{Mechanisms, Sandbox, SandboxSettings};
use hybrid_worker::telemetry::metrics::{WorkerDecision, metrics};
use hybrid_worker::worker::{Isolation, NetworkPolicy, Worker};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The uid of this file's jobs.
const EGRESS_UID: u32 = 220_000;

/// A local HTTP server that answers every request with `name` and counts its connections.
struct Server {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl Server {
    fn start(name: &'static str) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let first = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let body = format!("{name} saw {first}");
                let _ = write!(
                    stream,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Server { port, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A copy of the `egress` fixture whose `worker.toml` lists `network`, loaded as the daemon
/// loads it, with the fixture's venv.
fn egress_worker(root: &Path, network: &str, mode: Isolation) -> (Worker, std::path::PathBuf) {
    let fixture = hostile_worker("egress");
    let dir = root.join("egress");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for file in ["egress.py", "requirements.txt"] {
        std::fs::copy(fixture.worker.dir.join(file), dir.join(file)).expect("copy");
    }
    std::fs::write(
        dir.join("worker.toml"),
        format!("entrypoint = \"egress:run\"\ntimeout_s = 60\nnetwork = {network}\n"),
    )
    .expect("worker.toml");
    let mut worker = Worker::load(&dir).expect("the worker loads");
    worker.spec.isolation = mode;
    (worker, fixture.python)
}

fn decisions(decision: &str) -> u64 {
    metrics()
        .egress_connections
        .get_or_create(&WorkerDecision {
            worker: "egress".into(),
            decision: decision.into(),
        })
        .get()
}

async fn run_job(runner: &Runner, worker: &Worker, python: &Path, input: Value) -> Value {
    let request = RunRequest {
        worker,
        python: python.to_path_buf(),
        job_id: "egress-1",
        attempt: 1,
        correlation_id: None,
        input: &input,
        timeout: Duration::from_secs(60),
        extra_env: Vec::new(),
    };
    let report = runner.run(request, CancellationToken::new(), &|_| {}).await;
    match report.outcome {
        RunOutcome::Succeeded(v) => v,
        other => panic!(
            "the job failed: {other:?} (stderr: {})",
            report.stderr.text()
        ),
    }
}

/// The job reaches its one listed server through the proxy (plain HTTP and a CONNECT tunnel),
/// and every other way out is refused: by the proxy (403, 407) or by the kernel. `direct` is
/// the error a connection around the proxy gets with `mechanisms`.
async fn reaches_only_the_listed_server(mode: Isolation, mechanisms: Mechanisms, direct: &str) {
    let _serial = SERIAL.lock().await;
    let listed = Server::start("listed");
    let unlisted = Server::start("unlisted");
    let temp = tempfile::tempdir().expect("tmp");
    let settings = SandboxSettings {
        user: EGRESS_UID,
        group: 65534,
        ..SandboxSettings::default()
    };
    let sandbox = Sandbox::new(settings)
        .expect("the sandbox settings")
        .with_mechanisms(mechanisms);
    let runner = sandboxed_runner_in(temp.path(), sandbox);
    let (worker, python) = egress_worker(
        temp.path(),
        &format!("[\"127.0.0.1:{}\"]", listed.port),
        mode,
    );
    assert!(matches!(worker.limits().network, NetworkPolicy::List(_)));
    let (allowed, denied, unauthenticated) = (
        decisions("allowed"),
        decisions("denied"),
        decisions("unauthenticated"),
    );
    let out = run_job(
        &runner,
        &worker,
        &python,
        json!({"listed": listed.port, "unlisted": unlisted.port}),
    )
    .await;
    assert_eq!(
        out["proxy_env"],
        json!(["HTTPS_PROXY", "HTTP_PROXY", "http_proxy", "https_proxy"])
    );
    // The job's proxy credential does not leave the daemon in its result.
    let url = out["proxy_url"].as_str().unwrap_or_default();
    assert!(
        url.starts_with("http://job:[redacted:egress-proxy]@127.0.0.1:"),
        "{url}"
    );
    assert_eq!(
        out["via_proxy"]["ok"], "listed saw GET /plain HTTP/1.1",
        "{out:#}"
    );
    assert_eq!(
        out["via_tunnel"]["ok"], "listed saw GET /tunnel HTTP/1.1",
        "{out:#}"
    );
    assert_eq!(out["unlisted_via_proxy"]["http_status"], 403, "{out:#}");
    assert_eq!(out["no_credentials"]["ok"], 407, "{out:#}");
    // CONNECT to a name not on the list: refused by the proxy (http.client raises OSError
    // "Tunnel connection failed: 403").
    assert_eq!(
        out["unlisted_name_via_tunnel"]["error"], "OSError",
        "{out:#}"
    );
    // Around the proxy: refused by the kernel.
    for case in ["listed_direct", "unlisted_resolved_direct"] {
        assert_eq!(out[case]["error"], direct, "{case}: {out:#}");
    }
    // No UDP, no IPv6, no stream protocol but TCP: seccomp.
    for case in ["udp", "ipv6", "mptcp", "sctp"] {
        assert_eq!(out[case]["error"], "PermissionError", "{case}: {out:#}");
    }
    // The servers saw exactly the two proxied requests.
    assert_eq!(listed.connections(), 2, "the listed server's connections");
    assert_eq!(unlisted.connections(), 0, "the unlisted server was reached");
    // Each attempt through the proxy was counted. The proxy counts a connection when it is
    // done with it (after the relay, or after its answer's lingering close), which can be a
    // moment after the job has ended: wait for the counts, so that the next test starts from
    // settled ones.
    assert_eq!(settled("allowed", allowed + 2).await - allowed, 2);
    assert_eq!(settled("denied", denied + 2).await - denied, 2);
    assert_eq!(
        settled("unauthenticated", unauthenticated + 1).await - unauthenticated,
        1
    );
}

/// The count of `decision` once it reaches `want`, or after 10 s.
async fn settled(decision: &str, want: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = decisions(decision);
        if now >= want || tokio::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether this test process may make network namespaces (root); the tests that need one are
/// skipped, and say so, where it may not.
fn namespaces_here(test: &str) -> bool {
    match hybrid_worker::egress::netns::support() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("{test}: skipped, no network namespace here ({why})");
            false
        }
    }
}

/// Whether this kernel has Landlock's TCP rules (ABI 4+), without which nothing but a
/// namespace keeps a job from dialling around the proxy.
fn landlock_tcp_here(test: &str) -> bool {
    let support = hybrid_worker::sandbox::probe::KernelSupport::get();
    let tcp = matches!(support.landlock_abi, Ok(abi) if abi >= 4);
    if !tcp {
        eprintln!("{test}: skipped, no Landlock ABI 4 here");
    }
    tcp
}

/// The full sandbox: the namespace, and Landlock's connect rule inside it (EACCES first).
async fn every_way_around_the_proxy_is_refused(mode: Isolation) {
    if !(namespaces_here("every_way_around_the_proxy_is_refused")
        && landlock_tcp_here("every_way_around_the_proxy_is_refused"))
    {
        return;
    }
    reaches_only_the_listed_server(mode, Mechanisms::ALL, "PermissionError").await;
}

/// The namespace alone (Landlock off): the job's 127.0.0.1 is its own, where nothing but the
/// proxy listens, so a connection around the proxy finds nobody (ECONNREFUSED).
async fn the_namespace_alone_keeps_the_job_in(mode: Isolation) {
    if !namespaces_here("the_namespace_alone_keeps_the_job_in") {
        return;
    }
    let mechanisms = Mechanisms {
        landlock: false,
        ..Mechanisms::ALL
    };
    reaches_only_the_listed_server(mode, mechanisms, "ConnectionRefusedError").await;
}

/// No namespace (the fallback of a daemon that may not make one): the proxy listens in the
/// daemon's namespace, and Landlock lets the job connect to its port only.
async fn without_a_namespace_landlock_keeps_the_job_in(mode: Isolation) {
    if !landlock_tcp_here("without_a_namespace_landlock_keeps_the_job_in") {
        return;
    }
    let mechanisms = Mechanisms {
        netns: false,
        ..Mechanisms::ALL
    };
    reaches_only_the_listed_server(mode, mechanisms, "PermissionError").await;
}

crate::in_both_modes!(
    every_way_around_the_proxy_is_refused,
    the_namespace_alone_keeps_the_job_in,
    without_a_namespace_landlock_keeps_the_job_in,
);
