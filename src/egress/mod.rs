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
        let namespace = if use_netns {
            netns::create()
        } else {
            Err("the netns mechanism is turned off".into())
        };
        let (listener, netns) = match namespace {
            Ok(ns) => (ns.listener, Some(Arc::new(ns.fd))),
            Err(why) => {
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
                    &shared.worker,
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
