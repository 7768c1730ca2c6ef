//! One client connection: preamble, Open/Close, session routing, idle timeout, and the loop
//! that wakes links when messages arrive.
//!
//! A reader task turns bytes into frames and hands them over a channel, so the main loop's
//! `select!` never cancels a half-read frame. Any malformed input closes this connection
//! with an AMQP error; it never reaches other connections.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp_types::definitions::Error as AmqpError;
use fe2o3_amqp_types::performatives::{ChannelMax, Close, MaxFrameSize, Open, Performative};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;
use tokio::time::{Instant, interval, timeout};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::admission::Unauthenticated;
use super::cbs::Authz;
use super::error::amqp_error;
use super::frame::{
    AmqpFrame, FrameError, MIN_MAX_FRAME_SIZE, TYPE_AMQP, decode_amqp, encode_amqp, heartbeat,
    read_frame,
};
use super::sasl::negotiate;
use super::session::{Ctx, Fatal, Routed, Session};

/// Largest frame we accept. Smaller than a message (256 KiB), so large messages arrive in
/// several transfer frames, as they do from the cloud service.
const MAX_FRAME: u32 = 64 * 1024;
/// Idle timeout we announce; a silent peer is dropped after it (plus grace).
const IDLE_TIMEOUT: Duration = Duration::from_secs(240);
/// Time allowed for the protocol header, SASL and Open.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Highest channel number we hand out.
const CHANNEL_MAX: u16 = 1023;

type Incoming = Result<Option<AmqpFrame>, FrameError>;

/// Serves one accepted socket until it closes or the emulator shuts down. `pending` counts it
/// as unauthenticated until its first valid token; without one within the emulator's
/// `auth_timeout` it is closed.
pub async fn serve(
    mut stream: TcpStream,
    shared: Arc<Shared>,
    stop: CancellationToken,
    pending: Unauthenticated,
) {
    let peer = stream.peer_addr().ok();
    let handshake = HANDSHAKE_TIMEOUT.min(shared.auth_timeout);
    let evicted = pending.evicted.clone();
    let negotiated = tokio::select! {
        r = timeout(handshake, negotiate(&mut stream)) => r,
        () = evicted.cancelled() => {
            tracing::debug!(?peer, "Closed a connection without a token to admit a newer one.");
            return;
        }
    };
    match negotiated {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "Connection preamble failed.");
            return;
        }
        Err(_) => {
            tracing::debug!(?peer, "Connection preamble timed out.");
            return;
        }
    }
    let (rd, mut wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(64);
    let reader = tokio::spawn(read_loop(rd, tx));
    let result = run(&mut wr, rx, shared, stop, pending).await;
    reader.abort();
    if let Err(e) = result {
        tracing::debug!(?peer, error = %e, "Connection ended with an error.");
    }
    let _ = wr.shutdown().await;
}

async fn read_loop(rd: OwnedReadHalf, tx: mpsc::Sender<Incoming>) {
    let mut rd = BufReader::new(rd);
    loop {
        let item = match read_frame(&mut rd, MAX_FRAME).await {
            Ok(raw) if raw.frame_type != TYPE_AMQP => Err(FrameError::BadOffset(raw.frame_type)),
            Ok(raw) => decode_amqp(raw).map_err(FrameError::from),
            Err(e) => Err(e),
        };
        let stop = item.is_err();
        if tx.send(item).await.is_err() || stop {
            return;
        }
    }
}

struct Conn {
    shared: Arc<Shared>,
    authz: Authz,
    sessions: HashMap<u16, Session>,
    by_remote: HashMap<u16, u16>,
    remote_max_frame: u32,
    out: Vec<u8>,
    routed: Vec<Routed>,
}

enum Next {
    Continue,
    Closed,
}

async fn run(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Incoming>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    pending: Unauthenticated,
) -> Result<(), FrameError> {
    let accepted = Instant::now();
    let evicted = pending.evicted.clone();
    let mut pending = Some(pending);
    let Some(open) = open_handshake(wr, &mut rx, &shared).await? else {
        return Ok(());
    };
    let remote_idle = open
        .idle_time_out
        .filter(|ms| *ms > 0)
        .map(|ms| Duration::from_millis(u64::from(ms)));
    let mut conn = Conn {
        shared: shared.clone(),
        authz: Authz::default(),
        sessions: HashMap::new(),
        by_remote: HashMap::new(),
        remote_max_frame: open.max_frame_size.0.clamp(MIN_MAX_FRAME_SIZE, MAX_FRAME),
        out: Vec::new(),
        routed: Vec::new(),
    };
    let mut changed = shared.broker.subscribe();
    let mut tick = interval(Duration::from_millis(100));
    let mut last_recv = Instant::now();
    let mut last_sent = Instant::now();
    let mut closing = false;
    let mut more = false;
    while !closing {
        tokio::select! {
            // Output budget reached last round: write, glance at input, pump on.
            _ = tokio::task::yield_now(), if more => {}
            item = rx.recv() => match item {
                None => break,
                Some(item) => match conn.on_incoming(item) {
                    Step::Lost => break,
                    Step::Closing => closing = true,
                    Step::Continue => {
                        last_recv = Instant::now();
                        if pending.is_some() && conn.authz.any() {
                            pending = None;
                        }
                    }
                },
            },
            r = changed.changed() => if r.is_err() { break },
            _ = tick.tick() => {
                if last_recv.elapsed() > IDLE_TIMEOUT + Duration::from_secs(10) {
                    conn.close(Some(amqp_error("amqp:resource-limit-exceeded", "idle timeout")));
                    closing = true;
                } else if pending.is_some() && accepted.elapsed() > shared.auth_timeout {
                    conn.close(Some(amqp_error(
                        "amqp:unauthorized-access",
                        "no valid token was put on $cbs in time",
                    )));
                    closing = true;
                }
            }
            _ = stop.cancelled() => {
                conn.close(None);
                closing = true;
            }
            () = evicted.cancelled(), if pending.is_some() => {
                conn.close(Some(amqp_error(
                    "amqp:resource-limit-exceeded",
                    "too many connections without a token; this was the oldest",
                )));
                closing = true;
            }
        }
        if !closing {
            more = conn.pump();
        }
        if !conn.out.is_empty() {
            wr.write_all(&conn.out).await?;
            conn.out.clear();
            last_sent = Instant::now();
        }
        if let Some(idle) = remote_idle
            && last_sent.elapsed() >= idle / 2
        {
            wr.write_all(&heartbeat()).await?;
            last_sent = Instant::now();
        }
    }
    conn.release();
    wr.flush().await?;
    Ok(())
}

/// Waits (briefly) for the peer's `open` and answers with ours; `None` when the peer sent
/// anything else or nothing in time (the connection is dropped without a word).
async fn open_handshake(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    rx: &mut mpsc::Receiver<Incoming>,
    shared: &Shared,
) -> Result<Option<Open>, FrameError> {
    let open = match timeout(HANDSHAKE_TIMEOUT.min(shared.auth_timeout), rx.recv()).await {
        Ok(Some(Ok(Some(AmqpFrame {
            performative: Performative::Open(open),
            ..
        })))) => open,
        _ => return Ok(None),
    };
    let our_open = Open {
        container_id: "hybrid-worker-emulator".into(),
        hostname: None,
        max_frame_size: MaxFrameSize(MAX_FRAME),
        channel_max: ChannelMax(CHANNEL_MAX),
        idle_time_out: Some(IDLE_TIMEOUT.as_millis() as u32),
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    wr.write_all(&encode_amqp(0, &Performative::Open(our_open), &[])?)
        .await?;
    Ok(Some(open))
}

/// What one item from the reader means for the connection loop.
enum Step {
    /// The socket is gone: stop without a `close`.
    Lost,
    /// A `close` was sent (or received): write what is pending and stop.
    Closing,
    /// A frame (or a heartbeat) was handled.
    Continue,
}

impl Conn {
    /// Handles one item from the reader: a frame, a heartbeat, or a read error (a codec or
    /// framing error closes the connection with its AMQP condition).
    fn on_incoming(&mut self, item: Incoming) -> Step {
        match item {
            Err(FrameError::Io(_)) => Step::Lost,
            Err(e) => {
                let condition = match e {
                    FrameError::Codec(_) => "amqp:decode-error",
                    _ => "amqp:connection:framing-error",
                };
                self.close(Some(amqp_error(condition, &e.to_string())));
                Step::Closing
            }
            Ok(None) => Step::Continue,
            Ok(Some(frame)) => match self.handle(frame) {
                Ok(Next::Continue) => Step::Continue,
                Ok(Next::Closed) => Step::Closing,
                Err(Fatal(e)) => {
                    self.close(Some(e));
                    Step::Closing
                }
            },
        }
    }
}

impl Conn {
    fn ctx_parts(&mut self) -> (&mut HashMap<u16, Session>, &mut HashMap<u16, u16>, Ctx<'_>) {
        (
            &mut self.sessions,
            &mut self.by_remote,
            Ctx {
                shared: &self.shared,
                authz: &mut self.authz,
                out: &mut self.out,
                remote_max_frame: self.remote_max_frame,
                routed: &mut self.routed,
                saturated: false,
            },
        )
    }

    fn handle(&mut self, frame: AmqpFrame) -> Result<Next, Fatal> {
        let channel = frame.channel;
        let (sessions, by_remote, mut ctx) = self.ctx_parts();
        match frame.performative {
            Performative::Open(_) => {
                return Err(Fatal(amqp_error("amqp:illegal-state", "second open")));
            }
            Performative::Close(_) => {
                for s in sessions.values_mut() {
                    s.release_all(&ctx);
                }
                sessions.clear();
                self.close(None);
                return Ok(Next::Closed);
            }
            Performative::Begin(begin) => {
                if by_remote.contains_key(&channel) || begin.remote_channel.is_some() {
                    return Err(Fatal(amqp_error(
                        "amqp:connection:framing-error",
                        "begin on a channel already in use",
                    )));
                }
                let local = (0..=CHANNEL_MAX)
                    .find(|c| !sessions.contains_key(c))
                    .ok_or_else(|| {
                        Fatal(amqp_error(
                            "amqp:resource-limit-exceeded",
                            "too many sessions",
                        ))
                    })?;
                let session = Session::begin(local, channel, &begin, &mut ctx);
                sessions.insert(local, session);
                by_remote.insert(channel, local);
            }
            other => {
                let session = by_remote
                    .get(&channel)
                    .and_then(|local| sessions.get_mut(local))
                    .ok_or_else(|| {
                        Fatal(amqp_error(
                            "amqp:connection:framing-error",
                            "frame on a channel without a session",
                        ))
                    })?;
                match other {
                    Performative::Attach(a) => session.on_attach(a, &mut ctx)?,
                    Performative::Flow(f) => session.on_flow(f, &mut ctx),
                    Performative::Transfer(t) => session.on_transfer(t, frame.payload, &mut ctx)?,
                    Performative::Disposition(d) => session.on_disposition(d, &mut ctx),
                    Performative::Detach(d) => session.on_detach(d, &mut ctx),
                    Performative::End(_) => {
                        session.end(&mut ctx);
                        if let Some(local) = by_remote.remove(&channel) {
                            sessions.remove(&local);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.route();
        Ok(Next::Continue)
    }

    fn route(&mut self) {
        for r in std::mem::take(&mut self.routed) {
            // The link named by `reply-to` first, in whichever session it is: a client with
            // several sessions (one per Service Bus session it holds) has a reply link to the
            // same node in each, and a response must reach the one that asked.
            let mut pending = Some(r);
            for by_node in [false, true] {
                for s in self.sessions.values_mut() {
                    if let Some(r) = pending.take() {
                        pending = s.offer(r, by_node);
                    }
                }
            }
            if let Some(r) = pending {
                tracing::info!(node = %r.node, "Dropped a response: no link to reply on.");
            }
        }
    }

    /// Sends what links with credit can take; `true` when it stopped at the output budget.
    fn pump(&mut self) -> bool {
        let (sessions, _, mut ctx) = self.ctx_parts();
        for s in sessions.values_mut() {
            s.pump(&mut ctx);
        }
        ctx.saturated
    }

    fn close(&mut self, error: Option<AmqpError>) {
        match encode_amqp(0, &Performative::Close(Close { error }), &[]) {
            Ok(bytes) => self.out.extend(bytes),
            Err(e) => tracing::error!(error = %e, "Could not encode close; this is a bug."),
        }
    }

    fn release(&mut self) {
        let (sessions, _, ctx) = self.ctx_parts();
        for s in sessions.values_mut() {
            s.release_all(&ctx);
        }
    }
}
