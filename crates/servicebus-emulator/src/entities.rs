//! Entity definitions in the official emulator's `Config.json` shape (§7), so one file serves
//! both the official emulator and ours.

use std::time::Duration;

use serde::Deserialize;

use super::filter::{Rule, RuleEntry};
use thiserror::Error;

/// Why an entities file was refused.
#[derive(Debug, Error)]
pub enum EntitiesError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// File path.
        path: String,
        /// The i/o error.
        source: std::io::Error,
    },
    /// The JSON does not have the Config.json shape.
    #[error("not in the Config.json shape")]
    Json(#[from] serde_json::Error),
    /// A property is out of range or malformed.
    #[error("queue {queue}: {reason}")]
    Invalid {
        /// Queue name.
        queue: String,
        /// What is wrong.
        reason: String,
    },
}

/// Settings of one queue, with the official emulator's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue name as configured (addresses compare case-insensitively).
    pub name: String,
    /// How long a peek-lock (and a session lock) lasts.
    pub lock_duration: Duration,
    /// Deliveries allowed before the message moves to the DLQ.
    pub max_delivery_count: u32,
    /// Upper bound of a message's TTL.
    pub default_ttl: Duration,
    /// Expired messages go to the DLQ instead of vanishing.
    pub dead_letter_on_expiration: bool,
    /// Messages are grouped in sessions and received under a session lock.
    pub requires_session: bool,
    /// Drop messages whose message-id was seen within the window.
    pub duplicate_detection: bool,
    /// Duplicate detection window.
    pub duplicate_window: Duration,
    /// Auto-forwarding: messages sent here end up in this queue instead.
    pub forward_to: Option<String>,
    /// Dead-lettered messages go to this queue instead of the dead-letter sub-queue.
    pub forward_dead_letters_to: Option<String>,
    /// `MaxSizeInMegabytes` in bytes: what the queue and its dead-letter sub-queue may hold
    /// together; a send that would pass it is refused (`amqp:resource-limit-exceeded`).
    pub max_size_bytes: u64,
}

/// One megabyte as Service Bus counts `MaxSizeInMegabytes`.
const MEGABYTE: u64 = 1024 * 1024;
/// `MaxSizeInMegabytes` of the official emulator's entities (its documented entity size).
const EMULATOR_MAX_SIZE_MB: u64 = 100;

impl QueueConfig {
    /// A queue with the official emulator's defaults (its schema's `MaxDeliveryCount` is 3).
    pub fn new(name: &str) -> Self {
        QueueConfig {
            name: name.to_string(),
            lock_duration: Duration::from_secs(60),
            max_delivery_count: 3,
            default_ttl: Duration::from_secs(3600),
            dead_letter_on_expiration: false,
            requires_session: false,
            duplicate_detection: false,
            duplicate_window: Duration::from_secs(20),
            forward_to: None,
            forward_dead_letters_to: None,
            max_size_bytes: EMULATOR_MAX_SIZE_MB * MEGABYTE,
        }
    }

    /// The default entities of the embedded emulator: `jobs` and session-enabled `results`
    /// (`docs/contracts.md` §6), as `deploy/azure/main.tf` creates them: duplicate detection
    /// over 10 minutes on both (a reply resent after a lost lock is dropped, as in the cloud),
    /// 1024 MB each, expired jobs dead-lettered. Their messages do not expire for 7 days (jobs)
    /// and 1 day (replies), the deployment's defaults.
    pub fn defaults() -> Vec<QueueConfig> {
        const DAY: Duration = Duration::from_secs(24 * 3600);
        let deployed = |name: &str, max_delivery_count: u32, ttl: Duration| {
            let mut q = QueueConfig::new(name);
            q.max_delivery_count = max_delivery_count;
            q.default_ttl = ttl;
            q.duplicate_detection = true;
            q.duplicate_window = Duration::from_secs(600);
            q.max_size_bytes = 1024 * MEGABYTE;
            q
        };
        let mut jobs = deployed("jobs", 5, 7 * DAY);
        jobs.dead_letter_on_expiration = true;
        let mut results = deployed("results", 10, DAY);
        results.requires_session = true;
        vec![jobs, results]
    }
}

/// A topic: messages sent to it are copied to every subscription whose rules match.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicConfig {
    /// Topic name.
    pub name: String,
    /// Duplicate detection happens at the topic, before the copies are made.
    pub duplicate_detection: bool,
    /// Duplicate detection window.
    pub duplicate_window: Duration,
    /// Upper bound of a message's TTL, applied to each subscription too.
    pub default_ttl: Duration,
    /// The topic's subscriptions.
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// A subscription: a queue named `<topic>/Subscriptions/<name>` plus the rules that decide
/// which of the topic's messages it gets.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionConfig {
    /// Queue semantics of the subscription; its name is the full path.
    pub queue: QueueConfig,
    /// Rules; a message is copied when any rule matches. No rules means `$Default` (all).
    pub rules: Vec<Rule>,
}

/// Everything a `Config.json` defines.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Entities {
    /// Queues.
    pub queues: Vec<QueueConfig>,
    /// Topics with their subscriptions.
    pub topics: Vec<TopicConfig>,
}

impl Entities {
    /// The embedded defaults (see [`QueueConfig::defaults`]); no topics.
    pub fn defaults() -> Entities {
        Entities {
            queues: QueueConfig::defaults(),
            topics: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct File {
    user_config: UserConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UserConfig {
    #[serde(default)]
    namespaces: Vec<NamespaceConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NamespaceConfig {
    #[serde(default)]
    queues: Vec<QueueEntry>,
    #[serde(default)]
    topics: Vec<TopicEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct QueueEntry {
    name: String,
    #[serde(default)]
    properties: QueueProps,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TopicEntry {
    name: String,
    #[serde(default)]
    properties: QueueProps,
    #[serde(default)]
    subscriptions: Vec<SubscriptionEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SubscriptionEntry {
    name: String,
    #[serde(default)]
    properties: QueueProps,
    #[serde(default)]
    rules: Vec<RuleEntry>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct QueueProps {
    lock_duration: Option<String>,
    max_delivery_count: Option<u32>,
    default_message_time_to_live: Option<String>,
    dead_lettering_on_message_expiration: Option<bool>,
    requires_session: Option<bool>,
    requires_duplicate_detection: Option<bool>,
    duplicate_detection_history_time_window: Option<String>,
    forward_to: Option<String>,
    forward_dead_lettered_messages_to: Option<String>,
    /// Not in the official emulator's schema; Service Bus's entity property.
    max_size_in_megabytes: Option<u64>,
}

/// Reads a `Config.json` file.
pub fn load(path: &std::path::Path) -> Result<Entities, EntitiesError> {
    let text = std::fs::read_to_string(path).map_err(|source| EntitiesError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

/// Parses the text of a `Config.json` file.
pub fn parse(text: &str) -> Result<Entities, EntitiesError> {
    let file: File = serde_json::from_str(text)?;
    let mut out = Entities::default();
    let mut names: Vec<String> = Vec::new();
    let mut claim = |name: &str| -> Result<(), EntitiesError> {
        let invalid = |reason: &str| EntitiesError::Invalid {
            queue: name.to_string(),
            reason: reason.to_string(),
        };
        if !valid_name(name) {
            return Err(invalid("name has characters Service Bus does not allow"));
        }
        if names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Err(invalid("defined twice"));
        }
        names.push(name.to_string());
        Ok(())
    };
    for ns in file.user_config.namespaces {
        for entry in ns.queues {
            claim(&entry.name)?;
            let mut q = QueueConfig::new(&entry.name);
            apply(&mut q, &entry.properties)?;
            out.queues.push(q);
        }
        for entry in ns.topics {
            claim(&entry.name)?;
            let mut t = QueueConfig::new(&entry.name);
            apply(&mut t, &entry.properties)?;
            let mut topic = TopicConfig {
                name: entry.name.clone(),
                duplicate_detection: t.duplicate_detection,
                duplicate_window: t.duplicate_window,
                default_ttl: t.default_ttl,
                subscriptions: Vec::new(),
            };
            for sub in entry.subscriptions {
                let path = format!("{}/Subscriptions/{}", entry.name, sub.name);
                claim(&path)?;
                let mut q = QueueConfig::new(&path);
                q.default_ttl = t.default_ttl;
                apply(&mut q, &sub.properties)?;
                q.duplicate_detection = false;
                let rules = sub
                    .rules
                    .iter()
                    .map(|r| Rule::from_entry(r).map_err(|reason| invalid(&path, reason)))
                    .collect::<Result<Vec<_>, _>>()?;
                topic
                    .subscriptions
                    .push(SubscriptionConfig { queue: q, rules });
            }
            out.topics.push(topic);
        }
    }
    check_forwarding(&out)?;
    Ok(out)
}

/// Forwarding targets must be plain queues (not topics or subscriptions), not the entity
/// itself, and `ForwardTo` chains must end.
fn check_forwarding(e: &Entities) -> Result<(), EntitiesError> {
    let subs = e
        .topics
        .iter()
        .flat_map(|t| t.subscriptions.iter().map(|s| &s.queue));
    let all: Vec<&QueueConfig> = e.queues.iter().chain(subs).collect();
    let plain = |name: &str| e.queues.iter().find(|q| q.name.eq_ignore_ascii_case(name));
    for q in &all {
        let targets = [
            ("ForwardTo", &q.forward_to),
            ("ForwardDeadLetteredMessagesTo", &q.forward_dead_letters_to),
        ];
        for (key, target) in targets {
            let Some(target) = target else { continue };
            if target.eq_ignore_ascii_case(&q.name) {
                return Err(invalid(&q.name, format!("{key} names the entity itself")));
            }
            if plain(target).is_none() {
                return Err(invalid(
                    &q.name,
                    format!("{key}={target}: forwarding targets must be queues defined here"),
                ));
            }
        }
        let mut hop = q.forward_to.as_deref();
        for _ in 0..=e.queues.len() {
            hop = hop.and_then(plain).and_then(|n| n.forward_to.as_deref());
        }
        if hop.is_some() {
            return Err(invalid(&q.name, "ForwardTo chain loops".into()));
        }
    }
    Ok(())
}

fn invalid(name: &str, reason: String) -> EntitiesError {
    EntitiesError::Invalid {
        queue: name.to_string(),
        reason,
    }
}

fn apply(q: &mut QueueConfig, p: &QueueProps) -> Result<(), EntitiesError> {
    let name = q.name.clone();
    let target = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    q.forward_to = target(&p.forward_to);
    q.forward_dead_letters_to = target(&p.forward_dead_lettered_messages_to);
    let dur = |v: &Option<String>, key: &str| -> Result<Option<Duration>, EntitiesError> {
        v.as_deref()
            .map(|s| parse_iso_duration(s).ok_or_else(|| invalid(&name, format!("{key}={s:?}"))))
            .transpose()
    };
    if let Some(d) = dur(&p.lock_duration, "LockDuration")? {
        q.lock_duration = d;
    }
    if let Some(d) = dur(&p.default_message_time_to_live, "DefaultMessageTimeToLive")? {
        q.default_ttl = d;
    }
    if let Some(d) = dur(
        &p.duplicate_detection_history_time_window,
        "DuplicateDetectionHistoryTimeWindow",
    )? {
        q.duplicate_window = d;
    }
    if let Some(n) = p.max_delivery_count {
        if n == 0 {
            return Err(invalid(&name, "MaxDeliveryCount must be at least 1".into()));
        }
        q.max_delivery_count = n;
    }
    if let Some(mb) = p.max_size_in_megabytes {
        if !(1..=80 * 1024).contains(&mb) {
            return Err(invalid(
                &name,
                format!("MaxSizeInMegabytes={mb}: must be between 1 and 81920"),
            ));
        }
        q.max_size_bytes = mb * MEGABYTE;
    }
    q.dead_letter_on_expiration = p.dead_lettering_on_message_expiration.unwrap_or(false);
    q.requires_session = p.requires_session.unwrap_or(false);
    q.duplicate_detection = p.requires_duplicate_detection.unwrap_or(false);
    Ok(())
}

fn valid_name(name: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/');
    let first_last = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    first_last(name.chars().next()) && first_last(name.chars().last()) && name.chars().all(ok)
}

/// Parses an ISO 8601 duration such as `PT1M`, `PT0.5S`, `P1DT2H`.
pub fn parse_iso_duration(s: &str) -> Option<Duration> {
    let rest = s.strip_prefix('P')?;
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) => (d, t),
        None => (rest, ""),
    };
    let mut secs = 0f64;
    let mut parse = |part: &str, units: &[(char, f64)]| -> Option<()> {
        let mut num = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' {
                num.push(c);
            } else {
                let factor = units.iter().find(|(u, _)| *u == c)?.1;
                secs += num.parse::<f64>().ok()? * factor;
                num.clear();
            }
        }
        num.is_empty().then_some(())
    };
    parse(date, &[('D', 86_400.0), ('W', 604_800.0)])?;
    parse(time, &[('H', 3600.0), ('M', 60.0), ('S', 1.0)])?;
    Duration::try_from_secs_f64(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_iso_duration("PT1M"), Some(Duration::from_secs(60)));
        assert_eq!(
            parse_iso_duration("PT0.5S"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_iso_duration("P1DT1H"),
            Some(Duration::from_secs(90_000))
        );
        assert_eq!(parse_iso_duration("1M"), None);
        assert_eq!(parse_iso_duration("PT1X"), None);
    }

    #[test]
    fn forwarding_is_refused_unless_empty() {
        let with = |v: &str| {
            format!(
                r#"{{"UserConfig":{{"Namespaces":[{{"Name":"n","Queues":[
                {{"Name":"q","Properties":{{"ForwardTo":"{v}"}}}}]}}]}}}}"#
            )
        };
        assert!(parse(&with("")).is_ok());
        assert!(matches!(
            parse(&with("other")),
            Err(EntitiesError::Invalid { .. })
        ));
    }

    #[test]
    fn official_shape() -> Result<(), EntitiesError> {
        let text = r#"{"UserConfig":{"Namespaces":[{"Name":"sbemulatorns","Queues":[
            {"Name":"queue.1","Properties":{"LockDuration":"PT5S","MaxDeliveryCount":3,
             "RequiresSession":true,"DefaultMessageTimeToLive":"PT1H"}}]}],
            "Logging":{"Type":"File"}}}"#;
        let queues = parse(text)?.queues;
        assert_eq!(queues.len(), 1);
        assert_eq!(queues[0].lock_duration, Duration::from_secs(5));
        assert_eq!(queues[0].max_delivery_count, 3);
        assert!(queues[0].requires_session);
        Ok(())
    }
}
