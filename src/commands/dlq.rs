//! `hybrid-worker dlq list|show|replay|purge --queue Q`: dead-letter operations for operators.
//!
//! Selection reads the dead-letter sub-queue without locking anything (peek), page by page
//! with pages sized to fit a management response whatever the messages weigh, and keeps only
//! what it lists; it then acts only on the selected sequence numbers. Replay *moves*: the
//! dead letter's own AMQP message (see `copy`) is sent to the source queue first and the dead
//! letter is completed only after the send was accepted, so nothing is lost; what cannot be
//! carried is refused and kept. The copy's MessageId is new (`<job id>:replay-<seq>`) and it
//! carries the original job id, so the job keeps its identity and duplicate detection cannot
//! swallow it. Purge asks first (see `guard`). Every action writes one audit line (JSON) to
//! stdout and to the log.

mod copy;
mod guard;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::{EXIT_FAILED, UsageError};
use crate::broker::Broker;
use crate::cli::{DlqArgs, DlqCommand, DlqFilter};
use crate::config::Settings;
use crate::job::{JOB_ID_PROPERTY, one_line};
use crate::servicebus::client::ServiceBusBroker;
use crate::servicebus::message::Peeked;
use crate::servicebus::target::{Target, client};
use copy::{DESCRIPTION, REASON, replay_copy};

/// Widest `dlq list` cells: whatever senders put in ids and descriptions, one row stays one
/// line of bounded length.
const ID_CELL: usize = 64;
const SHORT_CELL: usize = 32;
const DESCRIPTION_CELL: usize = 160;

/// One dead letter, as listed (its body is not kept: large bodies would add up).
#[derive(Debug, Clone)]
struct Entry {
    sequence: i64,
    reason: String,
    description: String,
    worker: Option<String>,
    job_id: String,
    enqueued_at: Option<SystemTime>,
}

impl Entry {
    fn new(peeked: &Peeked) -> Option<Entry> {
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
            enqueued_at: peeked.enqueued_at,
        })
    }

    fn age(&self) -> Option<Duration> {
        self.enqueued_at
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
        DlqCommand::Purge {
            filter,
            action,
            yes,
        } => {
            // Refused before anything is read: a script without --yes learns at once.
            if !yes && !action.dry_run && !guard::interactive() {
                sb.close().await;
                return Err(guard::refusal().into());
            }
            act(
                &sb,
                &queue,
                filter,
                action,
                Action::Purge { confirmed: *yes },
            )
            .await
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
        let batch = sb.peek_page(from).await?;
        let Some(last) = batch
            .iter()
            .filter_map(|p| p.properties.sequence_number)
            .max()
        else {
            break;
        };
        for entry in batch.iter().filter_map(Entry::new) {
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
        // Senders choose these texts: control characters (terminal escapes, newlines) and
        // length are taken out before they reach the operator's screen.
        writeln!(
            out,
            "{:>8}  {:>8}  {:<20} {:<16} {:<38} {}",
            e.sequence,
            age,
            one_line(&e.reason, SHORT_CELL),
            one_line(e.worker.as_deref().unwrap_or("-"), SHORT_CELL),
            one_line(&e.job_id, ID_CELL),
            one_line(&e.description, DESCRIPTION_CELL)
        )?;
    }
    eprintln!("{} dead letter(s) matched", entries.len());
    Ok(ExitCode::SUCCESS)
}

async fn show(sb: &ServiceBusBroker, sequence: i64) -> anyhow::Result<ExitCode> {
    let Some((e, peeked)) = peek_one(sb, sequence).await? else {
        eprintln!("no dead letter with sequence number {sequence}");
        return Ok(ExitCode::from(EXIT_FAILED));
    };
    let p = &peeked.properties;
    let body = match &peeked.message.body {
        fe2o3_amqp_types::messaging::Body::Data(_) => serde_json::from_slice::<Value>(&peeked.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&peeked.body).into_owned())),
        // AMQP value and sequence bodies, in the AMQP type notation.
        other => Value::String(format!("{other:?}")),
    };
    let doc = json!({
        "sequence_number": e.sequence,
        "job_id": e.job_id,
        "reason": e.reason,
        "description": e.description,
        "worker": e.worker,
        "enqueued_at": e.enqueued_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        "delivery_count": peeked.delivery_count,
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

/// Dead letter `sequence` with its whole message, if it is still there.
async fn peek_one(sb: &ServiceBusBroker, sequence: i64) -> anyhow::Result<Option<(Entry, Peeked)>> {
    Ok(sb.peek(sequence, 1).await?.into_iter().find_map(|p| {
        Entry::new(&p)
            .filter(|e| e.sequence == sequence)
            .map(|e| (e, p))
    }))
}

enum Action {
    /// Send a copy (with the input replaced, if given) to the source queue, then complete.
    Replay(Option<Value>),
    /// Complete; `confirmed` by `--yes`, else the operator is asked.
    Purge { confirmed: bool },
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Replay(_) => "replay",
            Action::Purge { .. } => "purge",
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

/// Sends the copy of dead letter `entry` to `queue`; the error says why it was not sent.
async fn replay(
    sb: &ServiceBusBroker,
    queue: &str,
    entry: &Entry,
    edited: Option<&Value>,
) -> Result<(), String> {
    // The whole message is read again here, so that selection never holds bodies.
    let peeked = match peek_one(sb, entry.sequence).await {
        Ok(Some((_, peeked))) => peeked,
        Ok(None) => return Err("it could not be read again".into()),
        Err(e) => return Err(format!("reading it failed: {e}")),
    };
    let copy = replay_copy(&peeked.message, &entry.job_id, entry.sequence, edited)
        .map_err(|e| format!("cannot replay: {e}"))?;
    sb.send_message(queue, copy)
        .await
        .map_err(|e| format!("sending the copy failed: {e}"))
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
    if matches!(action, Action::Purge { confirmed: false }) && !entries.is_empty() {
        let dlq = format!("{queue}/$DeadLetterQueue");
        let mut stdin = std::io::stdin().lock();
        if !guard::ask(&mut stdin, &mut std::io::stderr(), entries.len(), &dlq)? {
            eprintln!("purge cancelled; nothing was deleted");
            return Ok(ExitCode::from(EXIT_FAILED));
        }
    }
    if opts.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(
            UsageError("--rate must be a positive number of messages per second".into()).into(),
        );
    }
    let tally = apply(sb, queue, &entries, opts.rate, &action).await?;
    eprintln!(
        "{name}: {} done, {} failed{}",
        tally.done,
        tally.failed,
        if tally.missing > 0 {
            format!(
                ", {} no longer found (settled by someone else?)",
                tally.missing
            )
        } else {
            String::new()
        }
    );
    Ok(if tally.failed == 0 && tally.missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// What [`apply`] did to the selected dead letters.
#[derive(Debug, Default)]
struct Tally {
    done: u64,
    failed: u64,
    /// Selected, but no longer on the dead-letter queue when received.
    missing: usize,
}

/// Receives the dead-letter queue with peek-lock and applies `action` to each selected entry
/// (at most `rate` per second), unlocking what was not selected or failed.
async fn apply(
    sb: &ServiceBusBroker,
    queue: &str,
    entries: &[Entry],
    rate: Option<f64>,
    action: &Action,
) -> anyhow::Result<Tally> {
    let mut wanted: BTreeSet<i64> = entries.iter().map(|e| e.sequence).collect();
    let by_seq: std::collections::BTreeMap<i64, &Entry> =
        entries.iter().map(|e| (e.sequence, e)).collect();
    let bar = indicatif::ProgressBar::new(wanted.len() as u64);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let mut pace = rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r)));
    let mut tally = Tally::default();
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
            let outcome = act_on_one(sb, queue, entry, delivery.lock_token, action).await;
            wanted.remove(&seq);
            bar.inc(1);
            match outcome {
                Ok(result) => {
                    tally.done += 1;
                    audit(action.name(), queue, entry, &result);
                }
                Err(why) => {
                    tally.failed += 1;
                    if sb.abandon(delivery.lock_token).await.is_err() {
                        tracing::warn!(
                            sequence_number = seq,
                            "Could not unlock a dead letter; it unlocks when its lock expires."
                        );
                    }
                    audit(action.name(), queue, entry, &format!("failed: {why}"));
                }
            }
        }
    }
    bar.finish_and_clear();
    for token in passed_over {
        // Unlock what was received but not selected, so it is visible again at once.
        let _ = sb.abandon(token).await;
    }
    tally.missing = wanted.len();
    Ok(tally)
}

/// Replays or purges one locked dead letter: the audit line's result, or why it failed.
async fn act_on_one(
    sb: &ServiceBusBroker,
    queue: &str,
    entry: &Entry,
    lock_token: uuid::Uuid,
    action: &Action,
) -> Result<String, String> {
    match action {
        Action::Replay(edited) => match replay(sb, queue, entry, edited.as_ref()).await {
            Ok(()) => sb
                .complete(lock_token)
                .await
                .map(|()| "moved".to_owned())
                .map_err(|e| format!("copy sent, but completing the dead letter failed: {e}")),
            Err(why) => Err(format!("{why}; dead letter kept")),
        },
        Action::Purge { .. } => sb
            .complete(lock_token)
            .await
            .map(|()| "purged".to_owned())
            .map_err(|e| e.to_string()),
    }
}
