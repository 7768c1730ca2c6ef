//! Workers: the `workers/<name>/` folder contract, its `worker.toml`, and the set of workers a
//! daemon serves.
//!
//! A worker is found by its folder; its name is the folder's name. `worker.toml` needs only the
//! entrypoint: every limit has a safe default, and an unknown key is refused so that a typo in a
//! limit never silently leaves the default in place.

pub mod pin;
pub mod python;
pub mod relocate;
pub mod venv;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::egress::rules::EgressRule;
pub use venv::{VenvError, VenvState};

/// A worker that cannot be loaded, with the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("workers folder {0} does not exist (set --workers-dir or HYBRID__WORKERS__DIR)")]
    NoDir(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("no worker named {name:?} in {dir} (workers here: {known})")]
    Unknown {
        name: String,
        dir: PathBuf,
        known: String,
    },
    #[error(
        "jobs run as uid {uid}, which cannot reach the worker folder {dir} ({blocked} is closed to it), and a copy it can read could not be made: {source}"
    )]
    Copy {
        uid: u32,
        dir: PathBuf,
        blocked: PathBuf,
        source: relocate::RelocateError,
    },
}

/// Whether a worker's job may open network connections: none (`"deny"`), any (`"allow"`), or
/// only to the `host:port` entries of a list, through the daemon's egress proxy
/// (`docs/egress.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "RawNetwork", into = "RawNetwork")]
pub enum NetworkPolicy {
    #[default]
    Deny,
    Allow,
    List(Vec<EgressRule>),
}

/// `network` as written in `worker.toml`: a word or a list of entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum RawNetwork {
    Word(String),
    List(Vec<String>),
}

impl TryFrom<RawNetwork> for NetworkPolicy {
    type Error = String;

    fn try_from(raw: RawNetwork) -> Result<Self, String> {
        match raw {
            RawNetwork::Word(w) if w == "deny" => Ok(NetworkPolicy::Deny),
            RawNetwork::Word(w) if w == "allow" => Ok(NetworkPolicy::Allow),
            RawNetwork::Word(w) => Err(format!(
                "network = {w:?} must be \"deny\", \"allow\" or a list of \"host:port\" entries"
            )),
            RawNetwork::List(entries) if entries.is_empty() => {
                Err("network = [] lists no destination: write network = \"deny\"".into())
            }
            RawNetwork::List(entries) => entries
                .iter()
                .map(|e| e.parse())
                .collect::<Result<_, _>>()
                .map(NetworkPolicy::List),
        }
    }
}

impl From<NetworkPolicy> for RawNetwork {
    fn from(policy: NetworkPolicy) -> Self {
        match policy {
            NetworkPolicy::Deny => RawNetwork::Word("deny".into()),
            NetworkPolicy::Allow => RawNetwork::Word("allow".into()),
            NetworkPolicy::List(rules) => {
                RawNetwork::List(rules.iter().map(ToString::to_string).collect())
            }
        }
    }
}

impl std::fmt::Display for NetworkPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetworkPolicy::Deny => f.write_str("deny"),
            NetworkPolicy::Allow => f.write_str("allow"),
            NetworkPolicy::List(rules) => {
                let entries: Vec<String> = rules.iter().map(ToString::to_string).collect();
                f.write_str(&entries.join(", "))
            }
        }
    }
}

/// How each job of a worker gets its fresh process.
///
/// `spawn` is the default: it is the simplest to reason about (nothing at all is shared with
/// anything that ran before), and it is the only mode that gives each running job a uid of its
/// own (`sandbox.users`). `fork` is opted into per worker once its handler is known to be safe
/// to import once and fork (no threads started at import, no per-job state made at import).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A fresh interpreter per job (`python -I`), started by the daemon.
    #[default]
    Spawn,
    /// A child forked per job from a warm parent that imported the handler and `preload`
    /// once, in the same sandbox; the child runs one job and exits (`crate::runner::warm`).
    Fork,
}

/// `worker.toml`, as written by a worker's author.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerToml {
    /// `module:function`, imported from the worker's folder.
    pub entrypoint: String,
    #[serde(default)]
    pub description: String,
    /// `spawn` (default) or `fork`.
    #[serde(default)]
    pub isolation: Isolation,
    /// Modules the warm parent imports besides the handler's (fork mode only), so that no job
    /// pays for them: e.g. `["pandas"]`.
    #[serde(default)]
    pub preload: Vec<String>,
    /// Names of the secrets (files of `secrets.dir`) each job is handed: `ctx.secret(name)`
    /// (docs/secrets.md).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Entra ID scopes the daemon gets tokens for on the job's behalf: `ctx.credential()`.
    #[serde(default)]
    pub azure_scopes: Vec<String>,
    /// The interpreter the worker's venv is built from, as a version requirement (`"3.12"`,
    /// `">=3.12"`); without it, `workers.python` ([`pin`]).
    #[serde(default)]
    pub python: Option<pin::PythonRequirement>,
    #[serde(flatten)]
    pub limits: Limits,
    #[serde(default)]
    pub retry: RetryPolicy,
}

/// What one job of the worker may use. Defaults are safe for an unknown handler.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock deadline of one attempt; a job's own `timeout_s` can only lower it.
    pub timeout_s: f64,
    /// Address-space ceiling of the job's process.
    pub memory_mb: u64,
    /// CPU seconds of the job's process.
    pub cpu_s: u64,
    /// Processes (and threads) the job's user may have.
    pub max_processes: u64,
    /// Attempts before a retryable failure becomes `MaxAttemptsExceeded`.
    pub max_attempts: u32,
    pub network: NetworkPolicy,
    /// Kept of each of stdout and stderr; the rest is counted and dropped.
    pub max_output_kb: u64,
    /// Largest result the handler may return (it goes into a Service Bus message).
    pub max_result_kb: u64,
    /// Extra environment variables for the job, with their values (never taken from the
    /// daemon's own environment).
    pub env: BTreeMap<String, String>,
    /// Absolute folders the job may write besides its temp folder (Landlock read-write).
    pub writable: Vec<PathBuf>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_s: 60.0,
            memory_mb: 512,
            cpu_s: 300,
            max_processes: 64,
            max_attempts: 3,
            network: NetworkPolicy::Deny,
            max_output_kb: 256,
            max_result_kb: 192,
            env: BTreeMap::new(),
            writable: Vec::new(),
        }
    }
}

impl Limits {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s)
    }
}

/// Exponential backoff between attempts, with jitter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    pub initial_delay_s: f64,
    pub max_delay_s: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay_s: 5.0,
            max_delay_s: 300.0,
        }
    }
}

/// A loaded worker: its folder and its checked `worker.toml`.
#[derive(Debug, Clone)]
pub struct Worker {
    pub name: String,
    pub dir: PathBuf,
    pub module: String,
    pub function: String,
    pub spec: WorkerToml,
}

impl Worker {
    /// This worker, or, when this process is root and the job user `uid`:`gid` cannot reach
    /// its folder (a checkout under `/root`), the same worker from a copy of its folder under
    /// `system_dir` ([`relocate::copy_worker`]). The copy is made at load: an edit to the
    /// original is seen at the daemon's next start.
    pub fn for_jobs(self, uid: u32, gid: u32, system_dir: &Path) -> Result<Worker, WorkerError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(self);
        }
        let Some(blocked) = crate::sandbox::unreachable_part(&self.dir, uid, gid) else {
            return Ok(self);
        };
        let copy = relocate::copy_worker(&self.name, &self.dir, system_dir).map_err(|source| {
            WorkerError::Copy {
                uid,
                dir: self.dir.clone(),
                blocked,
                source,
            }
        })?;
        tracing::info!(
            worker = %self.name,
            folder = %self.dir.display(),
            copy = %copy.display(),
            uid,
            "Jobs run as an unprivileged user that cannot reach the worker's folder; using a copy it can read."
        );
        Ok(Worker { dir: copy, ..self })
    }

    /// Loads `dir/worker.toml` and checks it.
    pub fn load(dir: &Path) -> Result<Worker, WorkerError> {
        // Jobs run in their own temp folder, so the worker's folder must be absolute.
        let dir = &std::fs::canonicalize(dir).map_err(|source| WorkerError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let path = dir.join("worker.toml");
        let invalid = |reason: String| WorkerError::Invalid {
            path: path.clone(),
            reason,
        };
        if !crate::job::is_valid_worker_name(&name) {
            return Err(invalid(format!(
                "the folder name {name:?} is not a worker name (letters, digits, '-', '_')"
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|source| WorkerError::Io {
            path: path.clone(),
            source,
        })?;
        let spec: WorkerToml =
            toml::from_str(&text).map_err(|e| invalid(e.message().to_owned()))?;
        let (module, function) = spec
            .entrypoint
            .split_once(':')
            .filter(|(m, f)| is_dotted_identifier(m) && is_identifier(f))
            .ok_or_else(|| {
                invalid(format!(
                    "entrypoint {:?} must be \"module:function\"",
                    spec.entrypoint
                ))
            })?;
        let (module, function) = (module.to_owned(), function.to_owned());
        check_limits(&spec).map_err(invalid)?;
        if !dir.join("requirements.txt").is_file() {
            return Err(invalid(
                "requirements.txt is missing (an empty file declares no dependencies)".into(),
            ));
        }
        Ok(Worker {
            name,
            dir: dir.to_path_buf(),
            module,
            function,
            spec,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.spec.limits
    }

    pub fn isolation(&self) -> Isolation {
        self.spec.isolation
    }

    pub fn requirements_path(&self) -> PathBuf {
        self.dir.join("requirements.txt")
    }

    /// Example inputs shipped with the worker, sorted by name.
    pub fn examples(&self) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(self.dir.join("examples"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        found.sort();
        found
    }
}

fn check_limits(spec: &WorkerToml) -> Result<(), String> {
    let l = &spec.limits;
    if !(l.timeout_s.is_finite() && l.timeout_s > 0.0 && l.timeout_s <= 86_400.0) {
        return Err(format!("timeout_s = {} must be in (0, 86400]", l.timeout_s));
    }
    if !(16..=1_048_576).contains(&l.memory_mb) {
        return Err(format!(
            "memory_mb = {} must be in [16, 1048576]",
            l.memory_mb
        ));
    }
    if l.cpu_s == 0 {
        return Err("cpu_s must be at least 1".into());
    }
    if l.max_processes == 0 {
        return Err("max_processes must be at least 1".into());
    }
    if !(1..=100).contains(&l.max_attempts) {
        return Err(format!(
            "max_attempts = {} must be in [1, 100]",
            l.max_attempts
        ));
    }
    if l.max_result_kb == 0 || l.max_result_kb > 100 * 1024 {
        return Err(format!(
            "max_result_kb = {} must be in [1, 102400]",
            l.max_result_kb
        ));
    }
    for key in l.env.keys() {
        let ok = !key.is_empty()
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !key.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            return Err(format!("env key {key:?} is not a variable name"));
        }
    }
    if let Some(path) = l.writable.iter().find(|p| !p.is_absolute()) {
        return Err(format!("writable path {} must be absolute", path.display()));
    }
    for name in &spec.secrets {
        crate::secrets::check_name(name)?;
    }
    for scope in &spec.azure_scopes {
        crate::secrets::check_scope(scope)?;
    }
    if let Some(bad) = spec.preload.iter().find(|m| !is_dotted_identifier(m)) {
        return Err(format!("preload entry {bad:?} is not a module name"));
    }
    let r = &spec.retry;
    let initial_ok = r.initial_delay_s.is_finite() && r.initial_delay_s >= 0.0;
    let max_ok = r.max_delay_s.is_finite() && r.max_delay_s >= r.initial_delay_s;
    if !(initial_ok && max_ok) {
        return Err("retry delays must be finite, >= 0, and initial_delay_s <= max_delay_s".into());
    }
    Ok(())
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_dotted_identifier(s: &str) -> bool {
    s.split('.').all(is_identifier)
}

/// Every worker in a folder, by name. A folder that fails to load is kept as an error so that
/// `workers list` can show it and the daemon can refuse to start with the reason.
#[derive(Debug, Default)]
pub struct Catalog {
    pub dir: PathBuf,
    pub workers: BTreeMap<String, Worker>,
    pub broken: Vec<WorkerError>,
}

impl Catalog {
    /// Scans `dir` for sub-folders with a `worker.toml`.
    pub fn scan(dir: &Path) -> Result<Catalog, WorkerError> {
        if !dir.is_dir() {
            return Err(WorkerError::NoDir(dir.to_path_buf()));
        }
        let entries = std::fs::read_dir(dir).map_err(|source| WorkerError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut folders: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("worker.toml").is_file())
            .collect();
        folders.sort();
        let mut catalog = Catalog {
            dir: dir.to_path_buf(),
            ..Default::default()
        };
        for folder in folders {
            match Worker::load(&folder) {
                Ok(w) => {
                    catalog.workers.insert(w.name.clone(), w);
                }
                Err(e) => catalog.broken.push(e),
            }
        }
        Ok(catalog)
    }

    /// Looks a worker up, or names the ones there are.
    pub fn get(&self, name: &str) -> Result<&Worker, WorkerError> {
        self.workers.get(name).ok_or_else(|| WorkerError::Unknown {
            name: name.to_owned(),
            dir: self.dir.clone(),
            known: self.names().join(", "),
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.workers.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_worker(root: &Path, name: &str, toml: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("worker.toml"), toml).expect("toml");
        std::fs::write(dir.join("requirements.txt"), "").expect("reqs");
        dir
    }

    #[test]
    fn only_the_entrypoint_is_required() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = write_worker(root.path(), "w1", "entrypoint = \"pkg.mod:run\"\n");
        let w = Worker::load(&dir).expect("loads");
        assert_eq!((w.module.as_str(), w.function.as_str()), ("pkg.mod", "run"));
        assert_eq!(w.limits(), &Limits::default());
        assert_eq!(w.limits().network, NetworkPolicy::Deny);
        assert_eq!(w.isolation(), Isolation::Spawn);
        let dir = write_worker(
            root.path(),
            "w2",
            "entrypoint = \"m:run\"\nisolation = \"fork\"\npreload = [\"json\", \"email.mime\"]\n",
        );
        let w = Worker::load(&dir).expect("loads");
        assert_eq!(w.isolation(), Isolation::Fork);
        assert_eq!(w.spec.preload, ["json", "email.mime"]);
        assert_eq!(w.spec.python, None);
        let dir = write_worker(
            root.path(),
            "w3",
            "entrypoint = \"m:run\"\npython = \"3.12\"\n",
        );
        let w = Worker::load(&dir).expect("loads");
        assert_eq!(
            w.spec.python.map(|p| p.to_string()).as_deref(),
            Some("3.12")
        );
    }

    #[test]
    fn bad_worker_toml_is_refused_with_the_reason() {
        let root = tempfile::tempdir().expect("tmp");
        let cases = [
            ("a", "entrypoint = \"nocolon\"\n", "module:function"),
            ("b", "entrypoint = \"m:f\"\ntimeout = 3\n", "unknown field"),
            ("c", "entrypoint = \"m:f\"\nmemory_mb = 1\n", "memory_mb"),
            (
                "d",
                "entrypoint = \"m:f\"\nnetwork = \"maybe\"\n",
                "network = \"maybe\" must be",
            ),
            (
                "d2",
                "entrypoint = \"m:f\"\nnetwork = [\"https://example.com:443\"]\n",
                "no scheme",
            ),
            ("d3", "entrypoint = \"m:f\"\nnetwork = []\n", "network = []"),
            (
                "e",
                "entrypoint = \"m:f\"\nmax_attempts = 0\n",
                "max_attempts",
            ),
            (
                "f",
                "entrypoint = \"m:f\"\nwritable = [\"data\"]\n",
                "must be absolute",
            ),
            (
                "g",
                "entrypoint = \"m:f\"\nisolation = \"thread\"\n",
                "unknown variant",
            ),
            (
                "h",
                "entrypoint = \"m:f\"\npreload = [\"os; import x\"]\n",
                "not a module name",
            ),
            (
                "i",
                "entrypoint = \"m:f\"\nsecrets = [\"../etc/shadow\"]\n",
                "secret name \"../etc/shadow\"",
            ),
            (
                "j",
                "entrypoint = \"m:f\"\nsecrets = [\"..\"]\n",
                "secret name",
            ),
            (
                "k",
                "entrypoint = \"m:f\"\nazure_scopes = [\"storage\"]\n",
                "azure_scopes entry \"storage\"",
            ),
            (
                "l",
                "entrypoint = \"m:f\"\npython = \"latest\"\n",
                "not a Python version requirement",
            ),
        ];
        for (name, toml, expected) in cases {
            let dir = write_worker(root.path(), name, toml);
            let err = Worker::load(&dir).expect_err(name).to_string();
            assert!(err.contains(expected), "{name}: {err}");
            assert!(err.contains("worker.toml"), "{err}");
        }
    }

    #[test]
    fn network_takes_a_list_of_host_port_entries() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = write_worker(
            root.path(),
            "w",
            "entrypoint = \"m:f\"\nnetwork = [\"*.blob.core.windows.net:443\", \"127.0.0.1:8080\"]\n",
        );
        let w = Worker::load(&dir).expect("loads");
        let NetworkPolicy::List(rules) = &w.limits().network else {
            panic!("not a list: {:?}", w.limits().network);
        };
        assert_eq!(rules.len(), 2);
        assert_eq!(
            w.limits().network.to_string(),
            "*.blob.core.windows.net:443, 127.0.0.1:8080"
        );
        let allow = write_worker(
            root.path(),
            "a",
            "entrypoint = \"m:f\"\nnetwork = \"allow\"\n",
        );
        assert_eq!(
            Worker::load(&allow).expect("loads").limits().network,
            NetworkPolicy::Allow
        );
    }

    #[test]
    fn catalog_keeps_broken_workers_apart() {
        let root = tempfile::tempdir().expect("tmp");
        write_worker(root.path(), "good", "entrypoint = \"m:f\"\n");
        write_worker(root.path(), "bad", "entrypoint = 3\n");
        std::fs::create_dir_all(root.path().join("not-a-worker")).expect("mkdir");
        let catalog = Catalog::scan(root.path()).expect("scan");
        assert_eq!(catalog.names(), vec!["good".to_string()]);
        assert_eq!(catalog.broken.len(), 1);
        let err = catalog.get("nope").expect_err("unknown").to_string();
        assert!(err.contains("good"), "{err}");
    }
}
