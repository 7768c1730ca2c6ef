//! Egress under the daemon's governance: a worker with `network = ["host:port", …]` reaches
//! exactly those destinations, through the daemon's proxy, and nothing else (`docs/egress.md`).
//!
//! Each such worker gets one [`Gateway`]: a listener on 127.0.0.1 inside a network namespace
//! that holds only loopback ([`netns`]), which the worker's jobs enter before they run, so the
//! kernel gives them no route to anything but the proxy. Where the daemon may not make a
//! namespace (not root), the listener is in the daemon's own namespace and the sandbox narrows
//! the job instead (Landlock: TCP connect only to the proxy's port; seccomp: TCP sockets only),
//! and the start-up report says the guarantee is the weaker one.
//!
//! Each job gets a random credential of its own in its proxy URL (`HTTPS_PROXY` and friends):
//! the proxy knows by it which job a connection belongs to (several jobs of a worker share its
//! listener), refuses connections without one, bounds each job's connections, and closes them
//! when the job ends.

pub mod head;
pub mod netns;
mod proxy;
pub mod rules;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use rules::EgressRule;

/// Most connections one job may have open through the proxy at once.
pub const MAX_CONNECTIONS_PER_JOB: usize = 32;
/// Most connections a gateway holds before they authenticate (each for at most the head's
/// timeout); more are closed at once.
pub const MAX_PENDING: usize = 64;

/// The environment variables that carry a job's proxy URL (upper and lower case: Python's
/// urllib, requests, httpx and the Azure SDKs read one or the other). `NO_PROXY` is not set.
pub const PROXY_VARIABLES: [&str; 4] = ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"];

/// A gateway could not be set up; the job does not start.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("the egress proxy must be started inside the daemon's async runtime")]
    NoRuntime,
    #[error("the egress proxy cannot listen: {0}")]
    Listen(String),
    #[error("cannot make the egress proxy's network namespace: {0}")]
    Namespace(String),
}

/// What the sandbox of a gateway's jobs needs: the proxy's port (Landlock's one allowed
/// connect port) and the namespace the job enters, when there is one.
#[derive(Debug, Clone)]
pub struct EgressSandbox {
    pub port: u16,
    pub netns: Option<Arc<OwnedFd>>,
}

/// The gateways of one runner, one per worker with an allow-list, made at its first use.
#[derive(Debug)]
pub struct Egress {
    /// Whether to try a network namespace per gateway (the sandbox's `netns` mechanism).
    netns: bool,
    gateways: Mutex<HashMap<String, Arc<Gateway>>>,
}

impl Egress {
    /// No gateway yet; each will have a namespace of its own if `netns` and the daemon may.
    pub fn new(netns: bool) -> Self {
        Self {
            netns,
            gateways: Mutex::new(HashMap::new()),
        }
    }

    /// The gateway of `worker`, started now if it has none. Must run inside a tokio runtime.
    pub fn gateway(&self, worker: &str) -> Result<Arc<Gateway>, EgressError> {
        let mut gateways = self.gateways.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = gateways.get(worker) {
            return Ok(g.clone());
        }
        let gateway = Arc::new(Gateway::start(worker, self.netns)?);
        gateways.insert(worker.to_owned(), gateway.clone());
        Ok(gateway)
    }
}

/// One running job, as the proxy knows it.
#[derive(Debug)]
struct JobEntry {
    job_id: String,
    rules: Vec<EgressRule>,
    connections: Arc<Semaphore>,
    /// Cancelled when the job ends: its connections close.
    ended: CancellationToken,
}

/// What a gateway's accept loop and connections share.
#[derive(Debug)]
struct Shared {
    worker: String,
    /// Running jobs, by the password of their proxy URL.
    jobs: Mutex<HashMap<String, Arc<JobEntry>>>,
    log_budget: Mutex<proxy::LogBudget>,
}

impl Shared {
    fn job(&self, password: &str) -> Option<Arc<JobEntry>> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.get(password).cloned()
    }
}

/// A worker's egress proxy: its listener, its namespace, its running jobs.
#[derive(Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
    port: u16,
    netns: Option<Arc<OwnedFd>>,
    stop: CancellationToken,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Gateway {
    /// Starts `worker`'s proxy: in a namespace of its own where the daemon may make one, in the
    /// daemon's otherwise (logged).
    fn start(worker: &str, use_netns: bool) -> Result<Gateway, EgressError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(EgressError::NoRuntime);
        }
        let started = std::time::Instant::now();
        // The fallback only where the report said so (the mechanism off, or this process may
        // not make namespaces): a namespace that fails here after the start-up probe made one
        // fails the job instead, so that what runs is what `workers verify` and
        // `sandbox.require` saw.
        let namespace = match (use_netns, netns::support()) {
            (true, Ok(())) => Some(netns::create().map_err(EgressError::Namespace)?),
            _ => None,
        };
        let (listener, netns) = match namespace {
            Some(ns) => (ns.listener, Some(Arc::new(ns.fd))),
            None => {
                let why = match netns::support() {
                    Err(why) if use_netns => why.clone(),
                    _ => "the netns mechanism is turned off".to_owned(),
                };
                tracing::warn!(worker, reason = %why, "No network namespace for the worker's jobs: the egress allow-list is enforced by Landlock's connect-port rule and seccomp only (see docs/egress.md).");
                let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    .map_err(|e| EgressError::Listen(e.to_string()))?;
                (listener, None)
            }
        };
        let listen_err = |e: std::io::Error| EgressError::Listen(e.to_string());
        let port = listener.local_addr().map_err(listen_err)?.port();
        listener.set_nonblocking(true).map_err(listen_err)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(listen_err)?;
        let shared = Arc::new(Shared {
            worker: worker.to_owned(),
            jobs: Mutex::new(HashMap::new()),
            log_budget: Mutex::new(proxy::LogBudget::default()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        tracing::info!(
            worker,
            port,
            netns = netns.is_some(),
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "Egress proxy started."
        );
        Ok(Gateway {
            shared,
            port,
            netns,
            stop,
        })
    }

    /// What the sandbox of this gateway's jobs needs.
    pub fn sandbox(&self) -> EgressSandbox {
        EgressSandbox {
            port: self.port,
            netns: self.netns.clone(),
        }
    }

    /// Lets job `job_id` use the proxy, to reach what `rules` list, until the returned pass is
    /// dropped (then its connections close).
    pub fn register(&self, job_id: &str, rules: &[EgressRule]) -> JobPass {
        let password = uuid::Uuid::new_v4().simple().to_string();
        let entry = Arc::new(JobEntry {
            job_id: job_id.to_owned(),
            rules: rules.to_vec(),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_JOB)),
            ended: CancellationToken::new(),
        });
        self.shared
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(password.clone(), entry.clone());
        JobPass {
            url: format!("http://job:{password}@127.0.0.1:{}", self.port),
            password,
            shared: self.shared.clone(),
            entry,
        }
    }
}

/// A job's right to use its worker's proxy; dropped when the job ends.
#[derive(Debug)]
pub struct JobPass {
    url: String,
    password: String,
    shared: Arc<Shared>,
    entry: Arc<JobEntry>,
}

impl JobPass {
    /// The job's credential for the proxy (in its proxy URL): scrubbed from what the job sends
    /// back, like a secret, though it is worthless once the job has ended.
    pub fn credential(&self) -> &str {
        &self.password
    }

    /// The variables that point the job's HTTP clients at the proxy.
    pub fn environment(&self) -> Vec<(String, String)> {
        PROXY_VARIABLES
            .iter()
            .map(|k| ((*k).to_owned(), self.url.clone()))
            .collect()
    }
}

impl Drop for JobPass {
    fn drop(&mut self) {
        self.shared
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.password);
        self.entry.ended.cancel();
    }
}

/// Accepts connections until the gateway is dropped; each is served by a task of its own.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => match pending.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(proxy::serve(stream, shared.clone(), permit));
                }
                Err(_) => proxy::record(
                    &shared,
                    &proxy::Attempt::refused("too many connections waiting to authenticate"),
                ),
            },
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::warn!(worker = %shared.worker, error = %e, "The egress proxy could not accept a connection.");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Sends `bytes` to the proxy and returns its whole answer.
    async fn ask(port: u16, bytes: &[u8]) -> String {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .expect("the proxy listens");
        // The proxy may answer and close before reading everything (an oversized head).
        let _ = s.write_all(bytes).await;
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    fn connect_head(target: &str, password: &str) -> Vec<u8> {
        use base64::Engine;
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("job:{password}"));
        format!("CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Basic {creds}\r\n\r\n")
            .into_bytes()
    }

    #[tokio::test]
    async fn hostile_requests_get_an_answer_and_no_connection() {
        // Without a namespace: the test reaches the listener on its own 127.0.0.1.
        let egress = Egress::new(false);
        let gateway = egress.gateway("w").expect("starts");
        let port = gateway.sandbox().port;
        let upstream = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("listen");
        let up_port = upstream.local_addr().expect("addr").port();
        let rules = [format!("127.0.0.1:{up_port}").parse().expect("rule")];
        let pass = gateway.register("job-1", &rules);
        let password = pass.password.clone();

        let huge = format!(
            "CONNECT a:1 HTTP/1.1\r\nX: {}\r\n\r\n",
            "x".repeat(head::MAX_HEAD)
        );
        let too_large = ask(port, huge.as_bytes()).await;
        assert!(too_large.starts_with("HTTP/1.1 431"), "{too_large:?}");
        assert!(
            ask(port, b"\x16\x03\x01garbage\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 400")
        );
        assert!(
            ask(port, b"GET /x HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 400")
        );
        let target = format!("127.0.0.1:{up_port}");
        let no_auth = ask(port, &connect_head(&target, "wrong")).await;
        assert!(no_auth.starts_with("HTTP/1.1 407"), "{no_auth}");
        let denied = ask(port, &connect_head("127.0.0.1:1", &password)).await;
        assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");

        // Allowed: the tunnel opens, and bytes sent right behind the head are relayed.
        let mut job = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .expect("c");
        let mut request = connect_head(&target, &password);
        request.extend_from_slice(b"hello");
        job.write_all(&request).await.expect("write");
        let (mut peer, _) = upstream.accept().await.expect("the proxy connects");
        let mut hello = [0u8; 5];
        peer.read_exact(&mut hello).await.expect("read");
        assert_eq!(&hello, b"hello");
        let mut established = [0u8; 39];
        job.read_exact(&mut established).await.expect("read");
        assert_eq!(&established, b"HTTP/1.1 200 Connection established\r\n\r\n");

        // Over the job's limit of connections at once: 429.
        let mut held = Vec::new();
        for _ in 1..MAX_CONNECTIONS_PER_JOB {
            let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .expect("c");
            s.write_all(&connect_head(&target, &password))
                .await
                .expect("w");
            let mut ok = [0u8; 39];
            s.read_exact(&mut ok).await.expect("200");
            held.push(s);
        }
        let limited = ask(port, &connect_head(&target, &password)).await;
        assert!(limited.starts_with("HTTP/1.1 429"), "{limited}");

        // The job ends: its tunnels close, and its credential is no longer accepted.
        drop(pass);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), job.read_to_end(&mut rest))
            .await
            .expect("the tunnel closes at the job's end")
            .expect("read");
        let after = ask(port, &connect_head(&target, &password)).await;
        assert!(after.starts_with("HTTP/1.1 407"), "{after}");
    }
}
