//! Reading what a job writes: capped stdout/stderr, and the channel carrying its log records
//! and its one result.
//!
//! Every reader keeps draining after its cap, so a job that prints without end never blocks on
//! a full pipe; only what fits the cap is kept, the rest is counted.

use std::os::fd::OwnedFd;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::secrets::tokens::TokenAsk;

/// At most `cap` bytes of a stream, and how much the job wrote in all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub kept: Vec<u8>,
    pub total: u64,
}

impl Captured {
    pub fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }

    /// The kept bytes as text, marked when the rest was dropped.
    pub fn text(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.truncated() {
            text.push_str(&format!(
                "\n[... {} more bytes dropped]",
                self.total - self.kept.len() as u64
            ));
        }
        text
    }
}

/// Reads a stream to its end, keeping the first `cap` bytes.
pub async fn capture(fd: OwnedFd, cap: usize) -> std::io::Result<Captured> {
    let mut rx = pipe::Receiver::from_owned_fd(fd)?;
    let mut out = Captured::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = rx.read(&mut buf).await?;
        if n == 0 {
            return Ok(out);
        }
        out.total += n as u64;
        let room = cap.saturating_sub(out.kept.len());
        out.kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

/// A log record the handler wrote through `ctx.logger` (or the `logging` module).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LogRecord {
    pub level: String,
    pub logger: String,
    pub msg: String,
}

/// What the runtime reports at the end of a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Output(Value),
    Error {
        kind: String,
        message: String,
        permanent: bool,
    },
}

/// The end of the channel: the report if one came, or why none could be read.
#[derive(Debug, Clone, PartialEq)]
pub enum ChannelEnd {
    Report(Report),
    /// The channel closed without a report (the process died or misbehaved).
    Nothing,
    /// A line was longer than the result limit allows.
    TooLarge {
        limit: usize,
    },
    /// A line was not part of the protocol.
    Garbled(String),
}

#[derive(Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum Line {
    Log(LogRecord),
    Result {
        output: Value,
    },
    Error {
        kind: String,
        message: String,
        #[serde(default)]
        permanent: bool,
    },
    /// A request for a token (docs/secrets.md), answered on the job's input pipe.
    Token(TokenAsk),
}

/// Reads the channel: forwards log records to `on_log` (up to `log_budget` bytes of them, the
/// rest counted in the returned number) and returns the report. A line over `line_limit` ends
/// reading at once with [`ChannelEnd::TooLarge`], without buffering the rest. Token requests
/// go to `asks` (dropped when it is full, or absent: the job's worker declares no scopes),
/// which is closed when reading ends.
pub async fn read_channel(
    fd: OwnedFd,
    line_limit: usize,
    log_budget: usize,
    asks: Option<mpsc::Sender<TokenAsk>>,
    on_log: &(dyn Fn(LogRecord) + Send + Sync),
) -> std::io::Result<(ChannelEnd, u64)> {
    let mut rx = pipe::Receiver::from_owned_fd(fd)?;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut log_bytes = 0usize;
    let mut dropped_logs = 0u64;
    let mut report: Option<Report> = None;
    let mut warned_asks = false;
    loop {
        let n = rx.read(&mut buf).await?;
        if n == 0 {
            let end = match report {
                Some(r) => ChannelEnd::Report(r),
                None if pending.is_empty() => ChannelEnd::Nothing,
                None => ChannelEnd::Garbled("the channel ended in the middle of a line".into()),
            };
            return Ok((end, dropped_logs));
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            match serde_json::from_slice::<Line>(&line) {
                Ok(Line::Log(record)) => {
                    log_bytes += line.len();
                    if log_bytes <= log_budget {
                        on_log(record);
                    } else {
                        dropped_logs += 1;
                    }
                }
                Ok(Line::Token(ask)) => {
                    let refused = match &asks {
                        Some(asks) => asks.try_send(ask).is_err().then_some(
                            "A job asked for more tokens at once than are served; such asks are dropped.",
                        ),
                        None => Some(
                            "A job whose worker declares no azure_scopes asked for a token; it gets none.",
                        ),
                    };
                    // Said once per job: a job cannot flood the daemon's log this way.
                    if let Some(why) = refused.filter(|_| !warned_asks) {
                        warned_asks = true;
                        tracing::warn!("{why}");
                    }
                }
                Ok(Line::Result { output }) if report.is_none() => {
                    report = Some(Report::Output(output));
                }
                Ok(Line::Error {
                    kind,
                    message,
                    permanent,
                }) if report.is_none() => {
                    report = Some(Report::Error {
                        kind,
                        message,
                        permanent,
                    });
                }
                Ok(_) => {
                    return Ok((
                        ChannelEnd::Garbled("the job reported more than one result".into()),
                        dropped_logs,
                    ));
                }
                Err(e) => {
                    return Ok((
                        ChannelEnd::Garbled(format!("a channel line is not protocol JSON: {e}")),
                        dropped_logs,
                    ));
                }
            }
        }
        if pending.len() > line_limit {
            return Ok((ChannelEnd::TooLarge { limit: line_limit }, dropped_logs));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pipe_with(data: &[u8]) -> OwnedFd {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let mut file = std::fs::File::from(w);
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = file.write_all(&data);
        });
        r
    }

    #[tokio::test]
    async fn capture_keeps_the_head_and_counts_the_rest() {
        let got = capture(pipe_with(&[b'x'; 100_000]), 10)
            .await
            .expect("read");
        assert_eq!(got.kept.len(), 10);
        assert_eq!(got.total, 100_000);
        assert!(got.text().contains("99990 more bytes dropped"));
    }

    #[tokio::test]
    async fn channel_forwards_logs_and_returns_the_result() {
        let data = b"{\"t\":\"log\",\"level\":\"INFO\",\"logger\":\"w\",\"msg\":\"hi\"}\n\
                     {\"t\":\"result\",\"output\":{\"a\":1}}\n";
        let logs = std::sync::Mutex::new(Vec::new());
        let on_log = |r: LogRecord| logs.lock().expect("lock").push(r.msg);
        let (end, dropped) = read_channel(pipe_with(data), 1000, 1000, None, &on_log)
            .await
            .expect("read");
        assert_eq!(
            end,
            ChannelEnd::Report(Report::Output(serde_json::json!({"a":1})))
        );
        assert_eq!(dropped, 0);
        assert_eq!(*logs.lock().expect("lock"), vec!["hi".to_string()]);
    }

    #[tokio::test]
    async fn channel_stops_at_an_oversize_line_and_rejects_garbage() {
        let big = vec![b'x'; 5000];
        let (end, _) = read_channel(pipe_with(&big), 1000, 0, None, &|_| {})
            .await
            .expect("read");
        assert_eq!(end, ChannelEnd::TooLarge { limit: 1000 });
        let (end, _) = read_channel(pipe_with(b"hello\n"), 1000, 0, None, &|_| {})
            .await
            .expect("read");
        assert!(matches!(end, ChannelEnd::Garbled(_)));
        let (end, _) = read_channel(pipe_with(b""), 1000, 0, None, &|_| {})
            .await
            .expect("read");
        assert_eq!(end, ChannelEnd::Nothing);
    }
}
