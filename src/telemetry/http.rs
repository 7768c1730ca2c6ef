//! One small HTTP port for the platform: `/metrics` (Prometheus text), `/healthz` (the process
//! answers) and `/readyz` (it can take jobs: broker link up, every worker's venv verified, not
//! draining, no daemon fault since the last job that started). Kubernetes probes and scrapers are its only clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::metrics::metrics;

/// What `/readyz` is made of; set by the daemon as it starts, runs and drains.
#[derive(Debug, Default)]
pub struct Readiness {
    pub workers_verified: AtomicBool,
    pub broker_up: AtomicBool,
    pub draining: AtomicBool,
    /// The daemon's last attempt to start a job failed through its own fault.
    pub daemon_faults: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.workers_verified.load(Ordering::SeqCst)
            && self.broker_up.load(Ordering::SeqCst)
            && !self.draining.load(Ordering::SeqCst)
            && !self.daemon_faults.load(Ordering::SeqCst)
    }

    fn explain(&self) -> String {
        format!(
            "workers_verified={} broker_up={} draining={} daemon_faults={}\n",
            self.workers_verified.load(Ordering::SeqCst),
            self.broker_up.load(Ordering::SeqCst),
            self.draining.load(Ordering::SeqCst),
            self.daemon_faults.load(Ordering::SeqCst)
        )
    }
}

/// The process's readiness.
pub fn readiness() -> &'static Readiness {
    static READY: OnceLock<Readiness> = OnceLock::new();
    READY.get_or_init(Readiness::default)
}

fn respond(request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, kind: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = kind.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain",
        );
    }
    match request.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            metrics().encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => {
            let r = readiness();
            let status = if r.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, r.explain(), "text/plain")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// Binds `listen` and serves until `stop` is cancelled. Returns the bound address.
pub async fn serve(listen: &str, stop: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "Accepting an HTTP connection failed.");
                        continue;
                    }
                },
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    Ok::<_, Infallible>(respond(&request))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}
