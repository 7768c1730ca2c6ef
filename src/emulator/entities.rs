//! Entity definitions in the official emulator's `Config.json` shape (§7), so one file serves
//! both the official emulator and ours.

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Why an entities file was refused.
#[derive(Debug, Error)]
pub enum EntitiesError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// The i/o error.
        source: std::io::Error,
    },
    /// The JSON does not have the Config.json shape.
    #[error("invalid entities file: {0}")]
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
}

impl QueueConfig {
    /// A queue with the official emulator's defaults.
    pub fn new(name: &str) -> Self {
        QueueConfig {
            name: name.to_string(),
            lock_duration: Duration::from_secs(60),
            max_delivery_count: 10,
            default_ttl: Duration::from_secs(3600),
            dead_letter_on_expiration: false,
            requires_session: false,
            duplicate_detection: false,
            duplicate_window: Duration::from_secs(20),
        }
    }

    /// The default entities of the embedded emulator: `jobs` and session-enabled `results`
    /// (design.md, "Stable names"). Their messages never expire, as in the cloud, because a
    /// job waiting an hour for a free worker must not vanish.
    pub fn defaults() -> Vec<QueueConfig> {
        let mut jobs = QueueConfig::new("jobs");
        jobs.default_ttl = Duration::MAX;
        let mut results = QueueConfig::new("results");
        results.default_ttl = Duration::MAX;
        results.requires_session = true;
        vec![jobs, results]
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
    namespaces: Vec<Namespace>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Namespace {
    #[serde(default)]
    queues: Vec<QueueEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct QueueEntry {
    name: String,
    #[serde(default)]
    properties: QueueProps,
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
}

/// Reads the queues of a `Config.json` file. Topics are not supported yet and are ignored.
pub fn load(path: &std::path::Path) -> Result<Vec<QueueConfig>, EntitiesError> {
    let text = std::fs::read_to_string(path).map_err(|source| EntitiesError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

/// Parses the text of a `Config.json` file.
pub fn parse(text: &str) -> Result<Vec<QueueConfig>, EntitiesError> {
    let file: File = serde_json::from_str(text)?;
    let mut out: Vec<QueueConfig> = Vec::new();
    for entry in file
        .user_config
        .namespaces
        .into_iter()
        .flat_map(|n| n.queues)
    {
        let invalid = |reason: String| EntitiesError::Invalid {
            queue: entry.name.clone(),
            reason,
        };
        if !valid_name(&entry.name) {
            return Err(invalid(
                "name has characters Service Bus does not allow".into(),
            ));
        }
        if out.iter().any(|q| q.name.eq_ignore_ascii_case(&entry.name)) {
            return Err(invalid("defined twice".into()));
        }
        let mut q = QueueConfig::new(&entry.name);
        let p = &entry.properties;
        let dur = |v: &Option<String>, key: &str| -> Result<Option<Duration>, EntitiesError> {
            v.as_deref()
                .map(|s| parse_iso_duration(s).ok_or_else(|| invalid(format!("{key}={s:?}"))))
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
                return Err(invalid("MaxDeliveryCount must be at least 1".into()));
            }
            q.max_delivery_count = n;
        }
        q.dead_letter_on_expiration = p.dead_lettering_on_message_expiration.unwrap_or(false);
        q.requires_session = p.requires_session.unwrap_or(false);
        q.duplicate_detection = p.requires_duplicate_detection.unwrap_or(false);
        out.push(q);
    }
    Ok(out)
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
    fn official_shape() -> Result<(), EntitiesError> {
        let text = r#"{"UserConfig":{"Namespaces":[{"Name":"sbemulatorns","Queues":[
            {"Name":"queue.1","Properties":{"LockDuration":"PT5S","MaxDeliveryCount":3,
             "RequiresSession":true,"DefaultMessageTimeToLive":"PT1H"}}]}],
            "Logging":{"Type":"File"}}}"#;
        let queues = parse(text)?;
        assert_eq!(queues.len(), 1);
        assert_eq!(queues[0].lock_duration, Duration::from_secs(5));
        assert_eq!(queues[0].max_delivery_count, 3);
        assert!(queues[0].requires_session);
        Ok(())
    }
}
