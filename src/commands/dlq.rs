//! `hybrid-worker dlq list|show|replay|purge --queue Q`: dead-letter operations for operators.
//!
//! Selection reads the dead-letter sub-queue without locking anything (peek), then acts only on
//! the selected sequence numbers. Replay *moves*: the copy is sent to the source queue first and
//! the dead letter is completed only after the send was accepted, so nothing is lost; the copy's
//! MessageId is new (`<job id>:replay-<seq>`) and it carries the original job id, so the job
//! keeps its identity and duplicate detection cannot swallow it. Every action writes one audit
//! line (JSON) to stdout and to the log.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::connect::{Target, client};
use super::{EXIT_FAILED, UsageError};
use crate::broker::{Broker, OutgoingMessage};
use crate::cli::{DlqArgs, DlqCommand, DlqFilter};
use crate::config::Settings;
use crate::job::{ATTEMPT_PROPERTY, JOB_ID_PROPERTY};
use crate::servicebus::client::ServiceBusBroker;
use crate::servicebus::message::Peeked;

/// Application properties Service Bus puts on a dead letter.
const REASON: &str = "DeadLetterReason";
const DESCRIPTION: &str = "DeadLetterErrorDescription";

/// One dead letter, as listed.
#[derive(Debug, Clone)]
struct Entry {
    sequence: i64,
    peeked: Peeked,
    reason: String,
    description: String,
    worker: Option<String>,
    job_id: String,
}

impl Entry {
    fn new(peeked: Peeked) -> Option<Entry> {
        let sequence = peeked.properties.sequence_number?;
        let app = &peeked.properties.application;
        let body: Option<Value> = serde_json::from_slice(&peeked.body).ok();
        let worker = body
            .as_ref()
            .and_then(|b| b.get("worker"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let job_id = app
            .get(JOB_ID_PROPERTY)
            .cloned()
            .or_else(|| peeked.properties.message_id.clone())
            .unwrap_or_else(|| format!("seq-{sequence}"));
        Some(Entry {
            sequence,
            reason: app.get(REASON).cloned().unwrap_or_default(),
            description: app.get(DESCRIPTION).cloned().unwrap_or_default(),
            worker,
            job_id,
            peeked,
        })
    }

    fn age(&self) -> Option<Duration> {
        self.peeked
            .enqueued_at
            .and_then(|t| SystemTime::now().duration_since(t).ok())
    }

    fn matches(&self, f: &DlqFilter, older_than: Option<Duration>) -> bool {
        f.reason
            .as_ref()
            .is_none_or(|r| r.eq_ignore_ascii_case(&self.reason))
            && f.worker
                .as_ref()
                .is_none_or(|w| self.worker.as_deref() == Some(w.as_str()))
            && older_than.is_none_or(|min| self.age().is_some_and(|age| age >= min))
            && f.grep
                .as_ref()
                .is_none_or(|g| self.description.to_lowercase().contains(&g.to_lowercase()))
    }
}

pub async fn run(settings: &Settings, args: &DlqArgs) -> anyhow::Result<ExitCode> {
    let queue = args
        .queue
        .clone()
        .unwrap_or_else(|| settings.queues.jobs.clone());
    let dlq = format!("{queue}/$DeadLetterQueue");
    let target = Target::of(settings)?;
    let sb = client(settings, &target, &dlq)?;
    let result = match &args.command {
        DlqCommand::List { filter } => list(&sb, filter).await,
        DlqCommand::Show { sequence } => show(&sb, *sequence).await,
        DlqCommand::Replay {
            filter,
            action,
            edit_input,
        } => {
            let edited = match edit_input {
                Some(path) => Some(super::exec::read_input(Some(path.as_str()))?),
                None => None,
            };
            act(&sb, &queue, filter, action, Action::Replay(edited)).await
        }
        DlqCommand::Purge { filter, action } => {
            act(&sb, &queue, filter, action, Action::Purge).await
        }
    };
    sb.close().await;
    result
}

fn older_than(filter: &DlqFilter) -> anyhow::Result<Option<Duration>> {
    filter
        .older_than
        .as_deref()
        .map(|text| {
            humantime::parse_duration(text).map_err(|e| {
                UsageError(format!("--older-than {text:?}: {e} (e.g. 30m, 2h, 7d)")).into()
            })
        })
        .transpose()
}

/// Every dead letter that matches the filter, oldest first, up to `--limit`.
async fn select(sb: &ServiceBusBroker, filter: &DlqFilter) -> anyhow::Result<Vec<Entry>> {
    let min_age = older_than(filter)?;
    let mut from = 1i64;
    let mut out = Vec::new();
    loop {
        let batch = sb.peek(from, 100).await?;
        let Some(last) = batch
            .iter()
            .filter_map(|p| p.properties.sequence_number)
            .max()
        else {
            break;
        };
        for entry in batch.into_iter().filter_map(Entry::new) {
            if entry.matches(filter, min_age) {
                out.push(entry);
            }
        }
        if filter.limit.is_some_and(|limit| out.len() >= limit) {
            break;
        }
        from = last + 1;
    }
    if let Some(limit) = filter.limit {
        out.truncate(limit);
    }
    Ok(out)
}

async fn list(sb: &ServiceBusBroker, filter: &DlqFilter) -> anyhow::Result<ExitCode> {
    let entries = select(sb, filter).await?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>8}  {:>8}  {:<20} {:<16} {:<38} DESCRIPTION",
        "SEQ", "AGE", "REASON", "WORKER", "JOB ID"
    )?;
    for e in &entries {
        let age = e
            .age()
            .map(|a| humantime::format_duration(Duration::from_secs(a.as_secs())).to_string())
            .unwrap_or_else(|| "?".into());
        let age = age.split(' ').take(2).collect::<Vec<_>>().join("");
        writeln!(
            out,
            "{:>8}  {:>8}  {:<20} {:<16} {:<38} {}",
            e.sequence,
            age,
            e.reason,
            e.worker.as_deref().unwrap_or("-"),
            e.job_id,
            e.description
        )?;
    }
    eprintln!("{} dead letter(s) matched", entries.len());
    Ok(ExitCode::SUCCESS)
}

async fn show(sb: &ServiceBusBroker, sequence: i64) -> anyhow::Result<ExitCode> {
    let found = sb
        .peek(sequence, 1)
        .await?
        .into_iter()
        .filter_map(Entry::new)
        .find(|e| e.sequence == sequence);
    let Some(e) = found else {
        eprintln!("no dead letter with sequence number {sequence}");
        return Ok(ExitCode::from(EXIT_FAILED));
    };
    let p = &e.peeked.properties;
    let body = serde_json::from_slice::<Value>(&e.peeked.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&e.peeked.body).into_owned()));
    let doc = json!({
        "sequence_number": e.sequence,
        "job_id": e.job_id,
        "reason": e.reason,
        "description": e.description,
        "worker": e.worker,
        "enqueued_at": e.peeked.enqueued_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        "delivery_count": e.peeked.delivery_count,
        "message_id": p.message_id,
        "correlation_id": p.correlation_id,
        "reply_to": p.reply_to,
        "reply_to_session_id": p.reply_to_session_id,
        "application_properties": p.application,
        "body": body,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(ExitCode::SUCCESS)
}

enum Action {
    /// Send a copy (with the input replaced, if given) to the source queue, then complete.
    Replay(Option<Value>),
    Purge,
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Replay(_) => "replay",
            Action::Purge => "purge",
        }
    }
}

/// Who ran the command, for the audit trail.
fn operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid:{}", nix::unistd::getuid()));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!("{user}@{host}")
}

fn audit(action: &str, queue: &str, e: &Entry, result: &str) {
    let line = json!({
        "at": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "who": operator(),
        "action": action,
        "queue": queue,
        "sequence_number": e.sequence,
        "job_id": e.job_id,
        "reason": e.reason,
        "result": result,
    });
    println!("{line}");
    tracing::info!(target: "audit", action, queue, sequence_number = e.sequence, job_id = %e.job_id, result, "Dead-letter operation.");
}

/// The copy a replay sends: the job as it was (or with `input` replaced), a fresh attempt
/// count, and the original job id.
fn replay_copy(e: &Entry, edited: Option<&Value>) -> anyhow::Result<OutgoingMessage> {
    let p = &e.peeked.properties;
    let body = match edited {
        None => e.peeked.body.clone(),
        Some(input) => {
            let mut doc: Value = serde_json::from_slice(&e.peeked.body).map_err(|_| {
                UsageError(format!(
                    "dead letter {} has no JSON body, so --edit-input cannot apply",
                    e.sequence
                ))
            })?;
            let Some(obj) = doc.as_object_mut() else {
                return Err(UsageError(format!(
                    "dead letter {}'s body is not a JSON object",
                    e.sequence
                ))
                .into());
            };
            obj.insert("input".into(), input.clone());
            serde_json::to_vec(&doc)?
        }
    };
    let mut application = p.application.clone();
    for key in [REASON, DESCRIPTION, ATTEMPT_PROPERTY] {
        application.remove(key);
    }
    application.insert(JOB_ID_PROPERTY.into(), e.job_id.clone());
    Ok(OutgoingMessage {
        message_id: Some(format!("{}:replay-{}", e.job_id, e.sequence)),
        correlation_id: p.correlation_id.clone(),
        session_id: None,
        reply_to: p.reply_to.clone(),
        reply_to_session_id: p.reply_to_session_id.clone(),
        content_type: p.content_type.clone(),
        application,
        body,
    })
}

async fn act(
    sb: &ServiceBusBroker,
    queue: &str,
    filter: &DlqFilter,
    opts: &crate::cli::DlqActionOpts,
    action: Action,
) -> anyhow::Result<ExitCode> {
    let entries = select(sb, filter).await?;
    let name = action.name();
    if opts.dry_run {
        for e in &entries {
            audit(name, queue, e, "dry-run");
        }
        eprintln!(
            "dry run: {} dead letter(s) would be {name}ed; nothing changed",
            entries.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if opts.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(
            UsageError("--rate must be a positive number of messages per second".into()).into(),
        );
    }
    let mut wanted: BTreeSet<i64> = entries.iter().map(|e| e.sequence).collect();
    let by_seq: std::collections::BTreeMap<i64, &Entry> =
        entries.iter().map(|e| (e.sequence, e)).collect();
    let bar = indicatif::ProgressBar::new(wanted.len() as u64);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let mut pace = opts
        .rate
        .map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r)));
    let (mut done, mut failed) = (0u64, 0u64);
    let mut passed_over = Vec::new();
    let mut empty_rounds = 0;
    while !wanted.is_empty() && empty_rounds < 3 {
        let batch = sb
            .receive(wanted.len().min(50), Duration::from_secs(2))
            .await?;
        if batch.is_empty() {
            empty_rounds += 1;
            continue;
        }
        empty_rounds = 0;
        for delivery in batch {
            let seq = delivery.properties.sequence_number.unwrap_or(-1);
            let Some(entry) = by_seq.get(&seq).filter(|_| wanted.contains(&seq)) else {
                passed_over.push(delivery.lock_token);
                continue;
            };
            if let Some(p) = pace.as_mut() {
                p.tick().await;
            }
            let outcome = match &action {
                Action::Replay(edited) => match replay_copy(entry, edited.as_ref()) {
                    Ok(copy) => match sb.send(queue, copy).await {
                        Ok(()) => sb
                            .complete(delivery.lock_token)
                            .await
                            .map(|()| "moved".to_owned())
                            .map_err(|e| {
                                format!("copy sent, but completing the dead letter failed: {e}")
                            }),
                        Err(e) => Err(format!("sending the copy failed, dead letter kept: {e}")),
                    },
                    Err(e) => Err(e.to_string()),
                },
                Action::Purge => sb
                    .complete(delivery.lock_token)
                    .await
                    .map(|()| "purged".to_owned())
                    .map_err(|e| e.to_string()),
            };
            wanted.remove(&seq);
            bar.inc(1);
            match outcome {
                Ok(result) => {
                    done += 1;
                    audit(name, queue, entry, &result);
                }
                Err(why) => {
                    failed += 1;
                    if sb.abandon(delivery.lock_token).await.is_err() {
                        tracing::warn!(
                            sequence_number = seq,
                            "Could not unlock a dead letter; it unlocks when its lock expires."
                        );
                    }
                    audit(name, queue, entry, &format!("failed: {why}"));
                }
            }
        }
    }
    bar.finish_and_clear();
    for token in passed_over {
        // Unlock what was received but not selected, so it is visible again at once.
        let _ = sb.abandon(token).await;
    }
    let missing = wanted.len();
    eprintln!(
        "{name}: {done} done, {failed} failed{}",
        if missing > 0 {
            format!(", {missing} no longer found (settled by someone else?)")
        } else {
            String::new()
        }
    );
    Ok(if failed == 0 && missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}
