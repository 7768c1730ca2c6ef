//! One connection to the egress proxy: read the head (bounded in size and time), find the job
//! by its credential, check the target against its worker's list, connect, relay both ways
//! until either side closes or the job ends, and record the attempt (log and metrics).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::head::{self, MAX_HEAD, Request};
use super::rules::{self, Target, TargetHost};
use super::{JobEntry, Shared};
use crate::telemetry::metrics::metrics;

/// How long a job has to send a complete head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the proxy tries to reach a destination (DNS included).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an error answer may take to write to a job that does not read (and to drain what
/// it still sends).
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Most bytes read and dropped after an error answer.
const LINGER_BYTES: usize = 64 * 1024;

/// One connection attempt, as logged and counted.
#[derive(Debug, Default)]
pub(super) struct Attempt {
    job_id: Option<String>,
    target: Option<Target>,
    /// `allowed`, `denied` (not on the list), `unauthenticated`, `limited` (too many
    /// connections), `invalid` (not a proxy request), `failed` (destination unreachable).
    decision: &'static str,
    detail: String,
    sent: u64,
    received: u64,
    started: Option<Instant>,
}

impl Attempt {
    pub(super) fn refused(detail: &str) -> Self {
        Attempt {
            decision: "limited",
            detail: detail.to_owned(),
            ..Attempt::default()
        }
    }
}

/// Refused attempts logged per worker and second at most; the rest are counted, and how many
/// were left out is logged with the next one logged.
const REFUSALS_LOGGED_PER_SECOND: u32 = 50;

/// The budget of refusal log lines of one worker: a job opening connections in a loop must not
/// flood the daemon's log (the metrics count every attempt).
#[derive(Debug)]
pub(super) struct LogBudget {
    window: Instant,
    logged: u32,
    skipped: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget {
            window: Instant::now(),
            logged: 0,
            skipped: 0,
        }
    }
}

impl LogBudget {
    /// Whether one more refusal may be logged now, and how many were skipped before it.
    fn take(&mut self) -> Option<u64> {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.logged = 0;
        }
        if self.logged < REFUSALS_LOGGED_PER_SECOND {
            self.logged += 1;
            Some(std::mem::take(&mut self.skipped))
        } else {
            self.skipped += 1;
            None
        }
    }
}

/// Logs `attempt` (refusals at warning level, within the worker's budget) and counts it in
/// `/metrics`.
pub(super) fn record(shared: &Shared, attempt: &Attempt) {
    let worker = shared.worker.as_str();
    metrics().egress_connection(worker, attempt.decision);
    let job_id = attempt.job_id.as_deref().unwrap_or("-");
    let (host, port) = match &attempt.target {
        Some(t) => (t.host.to_string(), t.port),
        None => ("-".to_owned(), 0),
    };
    let ms = attempt
        .started
        .map_or(0, |s| s.elapsed().as_millis() as u64);
    let (sent, received) = (attempt.sent, attempt.received);
    let decision = attempt.decision;
    if decision == "allowed" {
        tracing::info!(
            worker,
            job_id,
            host,
            port,
            decision,
            bytes_sent = sent,
            bytes_received = received,
            ms,
            "Egress connection."
        );
        return;
    }
    let budget = shared
        .log_budget
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let Some(skipped) = budget else { return };
    let detail = &attempt.detail;
    let message = if decision == "failed" {
        "Egress connection failed."
    } else {
        "Egress connection refused."
    };
    tracing::warn!(worker, job_id, host, port, decision, detail = %detail, bytes_sent = sent, bytes_received = received, ms, not_logged_before = skipped, "{message}");
}

/// Serves one accepted connection to its end; never panics on what the job sends.
pub(super) async fn serve(
    mut client: TcpStream,
    shared: Arc<Shared>,
    pending: OwnedSemaphorePermit,
) {
    let mut attempt = Attempt {
        started: Some(Instant::now()),
        ..Attempt::default()
    };
    let authorised = authorise(&mut client, &shared, &mut attempt).await;
    drop(pending);
    match authorised {
        Ok((job, request, rest)) => {
            connect_and_relay(client, &shared, &job, request, rest, &mut attempt).await;
            record(&shared, &attempt);
        }
        // Counted before the answer: its lingering close may outlast the job.
        Err(answer) => {
            record(&shared, &attempt);
            if let Some(answer) = answer {
                reply(&mut client, answer.status, answer.extra, &answer.body).await;
            }
        }
    }
}

/// The answer to a refused request.
struct Answer {
    status: &'static str,
    extra: &'static str,
    body: String,
}

impl Answer {
    fn new(status: &'static str, body: impl Into<String>) -> Option<Self> {
        Some(Self {
            status,
            extra: "",
            body: body.into(),
        })
    }
}

/// Reads and checks the head. A refusal is noted in `attempt` and comes back with the answer
/// the job gets (none when it closed first).
async fn authorise(
    client: &mut TcpStream,
    shared: &Shared,
    attempt: &mut Attempt,
) -> Result<(Arc<JobEntry>, Request, Vec<u8>), Option<Answer>> {
    let mut refuse = |decision, detail: String| {
        attempt.decision = decision;
        attempt.detail = detail;
    };
    let (head, rest) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(client)).await {
        Ok(Ok(read)) => read,
        Ok(Err(HeadRead::TooLarge)) => {
            refuse("invalid", format!("request head over {MAX_HEAD} bytes"));
            return Err(Answer::new(
                "431 Request Header Fields Too Large",
                "request head too large",
            ));
        }
        Ok(Err(HeadRead::Closed(why))) => {
            refuse(
                "invalid",
                format!("closed before a complete request head ({why})"),
            );
            return Err(None);
        }
        Err(_) => {
            refuse(
                "invalid",
                format!("no complete request head in {}s", HEAD_TIMEOUT.as_secs()),
            );
            return Err(Answer::new("408 Request Timeout", "request head too slow"));
        }
    };
    let parsed = match head::parse(&head) {
        Ok(parsed) => parsed,
        Err(e) => {
            refuse("invalid", e.to_string());
            return Err(Answer::new("400 Bad Request", e.to_string()));
        }
    };
    let target = match &parsed.request {
        Request::Connect { target } | Request::Plain { target, .. } => target.clone(),
    };
    attempt.target = Some(target.clone());
    let Some(job) = parsed.password.as_deref().and_then(|p| shared.job(p)) else {
        refuse(
            "unauthenticated",
            "no valid job credential (Proxy-Authorization)".into(),
        );
        return Err(Some(Answer {
            status: "407 Proxy Authentication Required",
            extra: "Proxy-Authenticate: Basic realm=\"hybrid-worker\"\r\n",
            body: "use the proxy URL from HTTPS_PROXY".into(),
        }));
    };
    attempt.job_id = Some(job.job_id.clone());
    if !rules::allowed(&job.rules, &target) {
        refuse("denied", "not on the worker's network list".into());
        let body = format!("{target} is not on worker {}'s network list", shared.worker);
        return Err(Answer::new("403 Forbidden", body));
    }
    Ok((job, parsed.request, rest))
}

/// Connects to `target` for the job (within [`CONNECT_TIMEOUT`], and not past the job's end);
/// when that fails, the job is told why (`502`, `504`) and `None` comes back.
async fn open_upstream(
    client: &mut TcpStream,
    job: &JobEntry,
    target: &Target,
    attempt: &mut Attempt,
) -> Option<TcpStream> {
    let connecting = tokio::select! {
        () = job.ended.cancelled() => {
            attempt.decision = "failed";
            attempt.detail = "the job ended while the proxy connected".into();
            return None;
        }
        c = tokio::time::timeout(CONNECT_TIMEOUT, dial(target)) => c,
    };
    match connecting {
        Ok(Ok(upstream)) => Some(upstream),
        Ok(Err(e)) => {
            attempt.decision = "failed";
            attempt.detail = e.to_string();
            reply(
                client,
                "502 Bad Gateway",
                "",
                &format!("cannot reach {target}: {e}"),
            )
            .await;
            None
        }
        Err(_) => {
            attempt.decision = "failed";
            attempt.detail = "connect timed out".into();
            reply(
                client,
                "504 Gateway Timeout",
                "",
                &format!("{target} did not answer"),
            )
            .await;
            None
        }
    }
}

/// Connects to the allowed target and relays until either side closes or the job ends.
async fn connect_and_relay(
    mut client: TcpStream,
    shared: &Shared,
    job: &JobEntry,
    request: Request,
    rest: Vec<u8>,
    attempt: &mut Attempt,
) {
    let Ok(_slot) = job.connections.clone().try_acquire_owned() else {
        attempt.decision = "limited";
        attempt.detail = format!(
            "over {} connections at once",
            super::MAX_CONNECTIONS_PER_JOB
        );
        reply(
            &mut client,
            "429 Too Many Requests",
            "",
            "too many connections for this job",
        )
        .await;
        return;
    };
    // A tunnel is told it is open, then carries whatever the job sent after its head; a plain
    // request goes upstream rewritten, followed by its body.
    let (target, first, is_connect) = match request {
        Request::Connect { target } => (target, rest, true),
        Request::Plain { target, mut head } => {
            head.extend_from_slice(&rest);
            (target, head, false)
        }
    };
    let Some(mut upstream) = open_upstream(&mut client, job, &target, attempt).await else {
        return;
    };
    let ready = async {
        if is_connect {
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
        }
        upstream.write_all(&first).await
    };
    let ready = tokio::select! {
        () = job.ended.cancelled() => Err(std::io::Error::other("the job ended")),
        ready = ready => ready,
    };
    if let Err(e) = ready {
        attempt.decision = "failed";
        attempt.detail = format!("before the relay: {e}");
        return;
    }
    attempt.decision = "allowed";
    let sent = AtomicU64::new(first.len() as u64);
    let received = AtomicU64::new(0);
    let m = metrics();
    let out = m.egress_bytes_counter(&shared.worker, "out");
    let inn = m.egress_bytes_counter(&shared.worker, "in");
    out.inc_by(first.len() as u64);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let relay = async {
        tokio::join!(
            pump(client_read, upstream_write, &sent, &out),
            pump(upstream_read, client_write, &received, &inn)
        )
    };
    tokio::select! {
        _ = relay => {}
        () = job.ended.cancelled() => attempt.detail = "closed at the job's end".into(),
    }
    attempt.sent = sent.load(Ordering::Relaxed);
    attempt.received = received.load(Ordering::Relaxed);
}

/// Connects to `target`: a name is resolved here, in the daemon's namespace.
async fn dial(target: &Target) -> std::io::Result<TcpStream> {
    match &target.host {
        TargetHost::Name(name) => TcpStream::connect((name.as_str(), target.port)).await,
        TargetHost::Ip(ip) => TcpStream::connect((*ip, target.port)).await,
    }
}

/// Why no head was read.
enum HeadRead {
    TooLarge,
    Closed(String),
}

/// Reads up to the end of the head; returns it and whatever came after it.
async fn read_head(client: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>), HeadRead> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = client
            .read(&mut chunk)
            .await
            .map_err(|e| HeadRead::Closed(e.to_string()))?;
        if n == 0 {
            return Err(HeadRead::Closed("end of stream".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        match head::head_end(&buf) {
            Some(end) if end <= MAX_HEAD => {
                let rest = buf.split_off(end);
                return Ok((buf, rest));
            }
            Some(_) => return Err(HeadRead::TooLarge),
            None => {}
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadRead::TooLarge);
        }
    }
}

/// Answers a refused request and closes (bounded in time: the job may not read).
async fn reply(client: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let body = format!("hybrid-worker egress proxy: {body}\n");
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REPLY_TIMEOUT, async {
        client.write_all(text.as_bytes()).await?;
        client.shutdown().await?;
        // A lingering close: closing with unread input would reset the connection, and the
        // job could lose the answer. What it still sends is read and dropped, within bounds.
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match client.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Copies `from` to `to` until end of stream or an error, counting into `count` and `total`,
/// then ends `to`'s writing side.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    count: &AtomicU64,
    total: &prometheus_client::metrics::counter::Counter,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        total.inc_by(n as u64);
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_within_a_budget_and_the_rest_counted() {
        let mut budget = LogBudget::default();
        for _ in 0..REFUSALS_LOGGED_PER_SECOND {
            assert_eq!(budget.take(), Some(0));
        }
        assert_eq!(budget.take(), None);
        assert_eq!(budget.take(), None);
        budget.window -= Duration::from_secs(1);
        assert_eq!(
            budget.take(),
            Some(2),
            "the next line says how many were left out"
        );
        assert_eq!(budget.take(), Some(0));
    }
}
