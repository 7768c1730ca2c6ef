//! Configuration: the embedded `config/default.toml`, an optional file, then `HYBRID__…`
//! environment variables, turned into checked types before anything runs.
//!
//! A bad value is refused at start with its key, its value and the reason, so an operator never
//! finds out about a typo from a half-started daemon.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The defaults, compiled in so the binary runs from any folder.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
/// Names the optional configuration file when `--config` is not given.
pub const CONFIG_FILE_VAR: &str = "HYBRID_CONFIG";
/// Prefix of the environment variables that override single keys.
pub const ENV_PREFIX: &str = "HYBRID";

/// A configuration that cannot be used, with enough detail to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration key `{key}` = {value:?} is invalid: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

fn invalid(key: &'static str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// The effective configuration, as loaded (see [`Settings::load`]) and checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub workers: WorkersSettings,
    pub servicebus: ServiceBusSettings,
    pub queues: QueueSettings,
    pub engine: EngineSettings,
    pub log: LogSettings,
    pub emulator: EmulatorSettings,
    pub http: HttpSettings,
    /// Who jobs run as when the daemon is root; see [`crate::sandbox`].
    pub sandbox: crate::sandbox::SandboxSettings,
    /// Claim-check Blob Storage for large inputs and results; see [`crate::storage`].
    pub storage: crate::storage::StorageSettings,
    /// The folder of secrets jobs may be handed; see [`crate::secrets`].
    #[serde(default)]
    pub secrets: crate::secrets::SecretsSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersSettings {
    pub dir: PathBuf,
    /// Empty means the user's cache folder; see [`WorkersSettings::venv_root`].
    pub venv_root: PathBuf,
    /// Where a root daemon keeps what its unprivileged jobs must read: venvs (by default),
    /// copies of an interpreter or worker folder they could not reach.
    pub system_dir: PathBuf,
    pub python: String,
    /// Workers allowed to run; empty allows every worker found.
    pub allow: Vec<String>,
}

impl WorkersSettings {
    /// The folder venvs live in: the configured one, else, for a root daemon,
    /// `<system_dir>/venvs`, else `$XDG_CACHE_HOME/hybrid-worker/venvs` (or `~/.cache/…`), else
    /// a folder under the system temp folder.
    pub fn venv_root(&self) -> PathBuf {
        if !self.venv_root.as_os_str().is_empty() {
            return self.venv_root.clone();
        }
        // Root's own cache (`/root`, mode 700) is closed to the users jobs run as.
        if nix::unistd::geteuid().is_root() {
            return self.system_dir.join("venvs");
        }
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| Path::new(&h).join(".cache"))
            })
            .unwrap_or_else(std::env::temp_dir);
        cache.join("hybrid-worker").join("venvs")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceBusSettings {
    /// Secret; never printed.
    pub connection_string: String,
    pub namespace: String,
    pub credential: crate::servicebus::credential::EntraSource,
    pub token_lifetime_s: u64,
    /// Whether the embedded emulator may stand in when no Service Bus is configured.
    pub embedded: EmbeddedEmulator,
}

/// `servicebus.embedded`: may a command fall back to the embedded emulator when neither
/// `servicebus.connection_string` nor `servicebus.namespace` is set?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddedEmulator {
    /// Yes: the local default, so `run` works on a fresh clone.
    Auto,
    /// No: nothing configured is an error (deployments, where it means a lost setting).
    Never,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub jobs: String,
    pub results: String,
    /// Queues besides `results` that a job's ReplyTo may name.
    pub reply_allowed: Vec<String>,
    /// The jobs queue requires sessions: run each session's jobs in order (`docs/sessions.md`).
    pub jobs_sessions: bool,
    /// How long a held session may go without a message before it is let go.
    pub session_idle_timeout_s: u64,
}

impl QueueSettings {
    pub fn session_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.session_idle_timeout_s)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    pub concurrency: usize,
    pub build_venvs_on_start: bool,
    pub drain_timeout_s: u64,
    pub max_lock_renewal_s: u64,
    pub max_body_kb: usize,
    pub temp_dir: PathBuf,
    pub receive_wait_s: u64,
}

impl EngineSettings {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_s)
    }

    pub fn max_lock_renewal(&self) -> Duration {
        Duration::from_secs(self.max_lock_renewal_s)
    }

    pub fn receive_wait(&self) -> Duration {
        Duration::from_secs(self.receive_wait_s)
    }

    /// The base folder of job temp dirs: the configured one or the system's.
    pub fn temp_dir(&self) -> PathBuf {
        if self.temp_dir.as_os_str().is_empty() {
            std::env::temp_dir()
        } else {
            self.temp_dir.clone()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, text when it is.
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// The `[emulator]` section belongs to the emulator's crate, which reads it.
pub use servicebus_emulator::cli::EmulatorSettings;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
}

/// Where configuration comes from, so that tests can load without touching the process
/// environment.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// `--config FILE`, else the `HYBRID_CONFIG` variable.
    pub file: Option<PathBuf>,
    /// `HYBRID__SECTION__KEY` variables (name, value).
    pub env: Vec<(String, String)>,
}

impl Sources {
    /// The sources of a real run: the given file (or `HYBRID_CONFIG`) and the process
    /// environment.
    pub fn from_process(file: Option<PathBuf>) -> Self {
        let file = file.or_else(|| {
            std::env::var_os(CONFIG_FILE_VAR)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        Self { file, env }
    }
}

impl Settings {
    /// Loads and checks the configuration from its three layers.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        use config::{Config, Environment, File, FileFormat};

        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = &sources.file {
            if !path.is_file() {
                return Err(ConfigError::File {
                    path: path.clone(),
                    reason: "no such file".into(),
                });
            }
            builder = builder.add_source(File::from(path.as_path()).required(true));
        }
        let env_map = sources.env.iter().cloned().collect();
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("workers.allow")
                .with_list_parse_key("sandbox.require")
                .with_list_parse_key("storage.input_containers")
                .with_list_parse_key("queues.reply_allowed")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_engine()?;
        self.validate_queues()?;
        self.validate_workers()?;
        self.validate_sandbox()?;
        self.validate_listeners()?;
        self.validate_servicebus()?;
        self.storage.validate().map_err(|e| ConfigError::Invalid {
            key: e.key,
            value: e.value,
            reason: e.reason,
        })?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                &self.log.level,
                "must be a tracing filter such as info or hybrid_worker=debug",
            ));
        }
        Ok(())
    }

    fn validate_engine(&self) -> Result<(), ConfigError> {
        let e = &self.engine;
        if !(1..=1024).contains(&e.concurrency) {
            return Err(invalid(
                "engine.concurrency",
                e.concurrency,
                "must be between 1 and 1024",
            ));
        }
        if e.max_body_kb == 0 || e.max_body_kb > 100 * 1024 {
            return Err(invalid(
                "engine.max_body_kb",
                e.max_body_kb,
                "must be between 1 and 102400 (Service Bus Premium's 100 MB)",
            ));
        }
        if e.receive_wait_s == 0 || e.receive_wait_s > 300 {
            return Err(invalid(
                "engine.receive_wait_s",
                e.receive_wait_s,
                "must be between 1 and 300",
            ));
        }
        if e.max_lock_renewal_s == 0 {
            return Err(invalid(
                "engine.max_lock_renewal_s",
                e.max_lock_renewal_s,
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn validate_queues(&self) -> Result<(), ConfigError> {
        let idle = self.queues.session_idle_timeout_s;
        if idle == 0 || idle > 3600 {
            return Err(invalid(
                "queues.session_idle_timeout_s",
                idle,
                "must be between 1 and 3600",
            ));
        }
        for (key, name) in [
            ("queues.jobs", &self.queues.jobs),
            ("queues.results", &self.queues.results),
        ] {
            if !is_entity_name(name) {
                return Err(invalid(
                    key,
                    name,
                    "must be a Service Bus entity name (letters, digits, '.', '-', '_', '/'; \
                     starting and ending with a letter or digit)",
                ));
            }
        }
        for name in &self.queues.reply_allowed {
            if !is_entity_name(name) {
                return Err(invalid(
                    "queues.reply_allowed",
                    name,
                    "each entry must be a queue name (a dead-letter sub-queue is never allowed)",
                ));
            }
            if name.eq_ignore_ascii_case(&self.queues.jobs) {
                return Err(invalid(
                    "queues.reply_allowed",
                    name,
                    "must not name queues.jobs: a reply sent there would run as a new job",
                ));
            }
        }
        Ok(())
    }

    fn validate_workers(&self) -> Result<(), ConfigError> {
        for name in &self.workers.allow {
            if !crate::job::is_valid_worker_name(name) {
                return Err(invalid(
                    "workers.allow",
                    name,
                    "each entry must be a worker name (letters, digits, '-', '_')",
                ));
            }
        }
        if self.workers.python.trim().is_empty() {
            return Err(invalid("workers.python", "", "must name an interpreter"));
        }
        Ok(())
    }

    fn validate_sandbox(&self) -> Result<(), ConfigError> {
        let sb = &self.sandbox;
        if sb.user == 0 || sb.group == 0 {
            return Err(invalid(
                "sandbox.user",
                format!("{}:{}", sb.user, sb.group),
                "jobs never run as root: user and group must not be 0",
            ));
        }
        if sb.users == 0
            || sb
                .user
                .checked_add(sb.users - 1)
                .is_none_or(|last| last == u32::MAX)
        {
            return Err(invalid(
                "sandbox.users",
                sb.users,
                "must be at least 1, and user + users - 1 a valid uid",
            ));
        }
        for name in &sb.require {
            if name != "all" && !crate::sandbox::MECHANISMS.contains(&name.as_str()) {
                return Err(invalid(
                    "sandbox.require",
                    name,
                    format!(
                        "each entry must be `all` or one of: {}",
                        crate::sandbox::MECHANISMS.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The embedded emulator's and the HTTP endpoint's listeners.
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let em = &self.emulator;
        if em.key.is_empty() {
            return Err(invalid("emulator.key", "", "must not be empty"));
        }
        within("emulator.auth_timeout_s", em.auth_timeout_s, 1, 3600)?;
        within(
            "emulator.max_unauthenticated",
            em.max_unauthenticated as u64,
            1,
            1 << 20,
        )?;
        for (key, addr) in [
            ("emulator.listen", &self.emulator.listen),
            ("http.listen", &self.http.listen),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                return Err(invalid(key, addr, "must be an address like 127.0.0.1:5672"));
            }
        }
        Ok(())
    }

    fn validate_servicebus(&self) -> Result<(), ConfigError> {
        if !self.servicebus.connection_string.is_empty()
            && !self
                .servicebus
                .connection_string
                .to_ascii_lowercase()
                .contains("endpoint=")
        {
            return Err(invalid(
                "servicebus.connection_string",
                "<redacted>",
                "must contain Endpoint=sb://…",
            ));
        }
        if !(2..=86_400).contains(&self.servicebus.token_lifetime_s) {
            return Err(invalid(
                "servicebus.token_lifetime_s",
                self.servicebus.token_lifetime_s,
                "must be between 2 and 86400 seconds",
            ));
        }
        if self.servicebus.namespace.contains("://") {
            return Err(invalid(
                "servicebus.namespace",
                &self.servicebus.namespace,
                "must be a host name like contoso.servicebus.windows.net, without a scheme",
            ));
        }
        Ok(())
    }

    /// The configuration as TOML with secrets replaced, for `config show`.
    pub fn redacted_toml(&self) -> Result<String, ConfigError> {
        let mut shown = self.clone();
        shown.servicebus.connection_string =
            redact_connection_string(&shown.servicebus.connection_string);
        shown.storage.connection_string =
            redact_connection_string(&shown.storage.connection_string);
        shown.emulator.key = "<redacted>".into();
        toml::to_string_pretty(&shown).map_err(|e| ConfigError::Load(e.to_string()))
    }
}

/// `value` of `key` must lie in `min..=max`.
fn within(key: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(invalid(
        key,
        value,
        format!("must be between {min} and {max}"),
    ))
}

/// Keeps a connection string's shape (so an operator can see which endpoint and rule are used)
/// and hides its secret parts.
pub fn redact_connection_string(cs: &str) -> String {
    cs.split(';')
        .filter(|part| !part.is_empty())
        .map(|part| match part.split_once('=') {
            Some((k, _))
                if k.eq_ignore_ascii_case("SharedAccessKey")
                    || k.eq_ignore_ascii_case("SharedAccessSignature")
                    || k.eq_ignore_ascii_case("AccountKey") =>
            {
                format!("{k}=<redacted>")
            }
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// Service Bus entity names as the service and the official emulator accept them.
pub fn is_entity_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge = |b: &u8| b.is_ascii_alphanumeric();
    match bytes {
        [] => false,
        [only] => edge(only),
        [first, .., last] => {
            name.len() <= 260
                && edge(first)
                && edge(last)
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_env(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load(&Sources {
            file: None,
            env: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    #[test]
    fn the_embedded_default_loads() {
        let s = load_env(&[]).expect("defaults are valid");
        assert_eq!(s.queues.jobs, "jobs");
        assert_eq!(s.queues.results, "results");
        assert_eq!(s.emulator.listen, "127.0.0.1:5672");
        assert_eq!(s.engine.concurrency, 4);
    }

    #[test]
    fn environment_variables_override_keys() {
        let s = load_env(&[
            ("HYBRID__ENGINE__CONCURRENCY", "9"),
            ("HYBRID__QUEUES__JOBS", "work"),
            ("HYBRID__WORKERS__ALLOW", "a,b-c"),
            ("HYBRID__QUEUES__REPLY_ALLOWED", "flow-a,flow-b"),
        ])
        .expect("valid");
        assert_eq!(
            s.queues.reply_allowed,
            vec!["flow-a".to_string(), "flow-b".to_string()]
        );
        assert_eq!(s.engine.concurrency, 9);
        assert_eq!(s.queues.jobs, "work");
        assert_eq!(s.workers.allow, vec!["a".to_string(), "b-c".to_string()]);
    }

    #[test]
    fn the_secrets_folder_comes_from_the_environment_and_is_off_by_default() {
        let s = load_env(&[]).expect("valid");
        assert_eq!(s.secrets.dir(), None);
        let s = load_env(&[("HYBRID__SECRETS__DIR", "/mnt/secrets")]).expect("valid");
        assert_eq!(s.secrets.dir(), Some(Path::new("/mnt/secrets")));
    }

    #[test]
    fn session_keys_load_from_the_environment_and_are_checked() {
        let s = load_env(&[]).expect("defaults");
        assert!(!s.queues.jobs_sessions);
        assert_eq!(s.queues.session_idle_timeout(), Duration::from_secs(5));
        let s = load_env(&[
            ("HYBRID__QUEUES__JOBS_SESSIONS", "true"),
            ("HYBRID__QUEUES__SESSION_IDLE_TIMEOUT_S", "30"),
        ])
        .expect("valid");
        assert!(s.queues.jobs_sessions);
        assert_eq!(s.queues.session_idle_timeout_s, 30);
        let err = load_env(&[("HYBRID__QUEUES__SESSION_IDLE_TIMEOUT_S", "0")]).expect_err("zero");
        assert!(
            err.to_string().contains("queues.session_idle_timeout_s"),
            "{err}"
        );
    }

    #[test]
    fn storage_loads_from_the_environment_and_its_key_is_redacted() {
        let s = load_env(&[
            ("HYBRID__STORAGE__INPUT_CONTAINERS", "uploads,exports"),
            (
                "HYBRID__STORAGE__CONNECTION_STRING",
                "AccountName=x;AccountKey=c2VjcmV0",
            ),
        ])
        .expect("valid");
        assert_eq!(s.storage.input_containers, ["uploads", "exports"]);
        let shown = s.redacted_toml().expect("toml");
        assert!(shown.contains("AccountKey=<redacted>") && !shown.contains("c2VjcmV0"));
        let err = load_env(&[("HYBRID__STORAGE__RESULTS_CONTAINER", "Results")]).expect_err("name");
        assert!(
            err.to_string().contains("storage.results_container"),
            "{err}"
        );
    }

    #[test]
    fn reply_queues_must_be_queues_and_never_the_jobs_queue() {
        for bad in ["jobs", "jobs/$DeadLetterQueue"] {
            let err = load_env(&[("HYBRID__QUEUES__REPLY_ALLOWED", bad)]).expect_err(bad);
            assert!(err.to_string().contains("queues.reply_allowed"), "{err}");
        }
    }

    #[test]
    fn a_bad_value_names_key_value_and_reason() {
        let err = load_env(&[("HYBRID__ENGINE__CONCURRENCY", "0")]).expect_err("zero");
        let text = err.to_string();
        assert!(
            text.contains("engine.concurrency") && text.contains("\"0\""),
            "{text}"
        );
        let err = load_env(&[("HYBRID__ENGINE__CONCURRENCY", "many")]).expect_err("text");
        assert!(err.to_string().contains("concurrency"), "{err}");
        let err = load_env(&[("HYBRID__QUEUES__JOBS", "-bad")]).expect_err("name");
        assert!(err.to_string().contains("queues.jobs"), "{err}");
        let err = load_env(&[("HYBRID__ENGINE__NO_SUCH_KEY", "1")]).expect_err("unknown");
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }

    #[test]
    fn jobs_never_run_as_root_and_the_uid_range_fits() {
        let err = load_env(&[("HYBRID__SANDBOX__USER", "0")]).expect_err("root");
        assert!(err.to_string().contains("sandbox.user"), "{err}");
        let err = load_env(&[("HYBRID__SANDBOX__USERS", "0")]).expect_err("none");
        assert!(err.to_string().contains("sandbox.users"), "{err}");
        let err = load_env(&[
            ("HYBRID__SANDBOX__USER", "4294967290"),
            ("HYBRID__SANDBOX__USERS", "10"),
        ])
        .expect_err("overflow");
        assert!(err.to_string().contains("sandbox.users"), "{err}");
        let ok = load_env(&[
            ("HYBRID__SANDBOX__USER", "100000"),
            ("HYBRID__SANDBOX__USERS", "8"),
        ])
        .expect("a range");
        assert_eq!((ok.sandbox.user, ok.sandbox.users), (100_000, 8));
    }

    #[test]
    fn the_cgroup_setting_is_auto_off_or_an_absolute_path() {
        use crate::sandbox::cgroup::CgroupSetting;
        assert_eq!(
            load_env(&[]).expect("default").sandbox.cgroup,
            CgroupSetting::Auto
        );
        let off = load_env(&[("HYBRID__SANDBOX__CGROUP", "off")]).expect("off");
        assert_eq!(off.sandbox.cgroup, CgroupSetting::Off);
        let path = load_env(&[("HYBRID__SANDBOX__CGROUP", "/sys/fs/cgroup/hybrid")]).expect("path");
        assert_eq!(
            path.sandbox.cgroup,
            CgroupSetting::Path("/sys/fs/cgroup/hybrid".into())
        );
        let err = load_env(&[("HYBRID__SANDBOX__CGROUP", "cgroups/hybrid")]).expect_err("relative");
        let text = err.to_string();
        assert!(
            text.contains("sandbox.cgroup") && text.contains("\"cgroups/hybrid\""),
            "{text}"
        );
    }

    #[test]
    fn a_config_file_layers_between_default_and_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[engine]\nconcurrency = 2\ndrain_timeout_s = 7\n").expect("write");
        let s = Settings::load(&Sources {
            file: Some(path.clone()),
            env: vec![("HYBRID__ENGINE__CONCURRENCY".into(), "3".into())],
        })
        .expect("valid");
        assert_eq!(s.engine.concurrency, 3);
        assert_eq!(s.engine.drain_timeout_s, 7);
        let missing = Settings::load(&Sources {
            file: Some(dir.path().join("nope.toml")),
            env: vec![],
        });
        assert!(matches!(missing, Err(ConfigError::File { .. })));
    }

    #[test]
    fn config_show_redacts_secrets() {
        let s = load_env(&[(
            "HYBRID__SERVICEBUS__CONNECTION_STRING",
            "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=SECRET;",
        )])
        .expect("valid");
        let shown = s.redacted_toml().expect("toml");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("SharedAccessKeyName=k"));
    }

    #[test]
    fn entity_names() {
        assert!(is_entity_name("jobs"));
        assert!(is_entity_name("a"));
        assert!(is_entity_name("team/jobs.v2"));
        assert!(!is_entity_name(""));
        assert!(!is_entity_name("-x"));
        assert!(!is_entity_name("x y"));
    }
}
