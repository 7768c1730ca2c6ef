//! Secrets, scrubbing and tokens under the daemon's governance (docs/secrets.md).
//!
//! A worker declares the secrets it needs (`secrets = [...]` in `worker.toml`) and the Entra ID
//! scopes it may get tokens for (`azure_scopes`). The daemon alone reads the secrets folder
//! (`secrets.dir`): at each job's start it reads that job's declared secrets and hands them to
//! the job in its job document, over the job's private pipe (never its environment, never a
//! file), so a rotated secret is picked up by the next job. Everything the job sends back is
//! scrubbed of those values ([`scrub`]); tokens are obtained with the daemon's own identity
//! ([`tokens`]), only for declared scopes.

pub mod audit;
pub mod scrub;
pub mod tokens;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest secret the daemon hands to a job (Key Vault secrets are at most 25 KiB).
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// `[secrets]` of the configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsSettings {
    /// The folder holding one file per secret (the Secrets Store CSI driver's mount on AKS);
    /// empty means none: a worker declaring secrets has its jobs refused with `PolicyDenied`.
    pub dir: PathBuf,
}

impl SecretsSettings {
    /// The configured folder, if any.
    pub fn dir(&self) -> Option<&Path> {
        (!self.dir.as_os_str().is_empty()).then_some(self.dir.as_path())
    }
}

/// What the daemon hands jobs besides their input: the secrets folder and the token source.
#[derive(Debug, Clone, Default)]
pub struct Governance {
    pub secrets_dir: Option<PathBuf>,
    /// `None`: no worker declares scopes, or no credential (each ask is answered with an
    /// error).
    pub tokens: Option<std::sync::Arc<tokens::TokenBroker>>,
}

/// Whether `name` may name a secret: a plain file name of letters, digits, `-`, `_` and `.`,
/// not starting with a dot (no path separator, no `.`/`..`, none of the CSI driver's own
/// `..data` entries), at most 127 characters (Key Vault's longest name).
pub fn check_name(name: &str) -> Result<(), String> {
    let chars_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > 127 || !chars_ok || name.starts_with('.') {
        return Err(format!(
            "secret name {name:?} must be a file name of letters, digits, '-', '_' and '.', not starting with '.', at most 127 characters"
        ));
    }
    Ok(())
}

/// Whether `scope` may be declared in `azure_scopes`: an absolute `https://` or `api://` URI
/// without spaces, at most 512 characters.
pub fn check_scope(scope: &str) -> Result<(), String> {
    let scheme_ok = scope.starts_with("https://") || scope.starts_with("api://");
    let chars_ok = scope.chars().all(|c| c.is_ascii_graphic());
    if !scheme_ok || !chars_ok || scope.len() > 512 {
        return Err(format!(
            "azure_scopes entry {scope:?} must be an https:// or api:// URI without spaces (e.g. \"https://storage.azure.com/.default\")"
        ));
    }
    Ok(())
}

/// The secrets of one job, by name. Never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct JobSecrets {
    pub values: Vec<(String, String)>,
}

impl fmt::Debug for JobSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.values.iter().map(|(n, _)| n.as_str()).collect();
        write!(f, "JobSecrets({names:?}, values redacted)")
    }
}

/// A declared secret the daemon could not hand to a job: the job fails with `PolicyDenied`.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "the worker declares secret {name:?} but this daemon has no secrets folder (set secrets.dir / HYBRID__SECRETS__DIR)"
    )]
    NoDir { name: String },
    #[error("secret {name:?} cannot be read from {path}: {source}")]
    Unreadable {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret {name:?} at {path} is larger than {MAX_SECRET_BYTES} bytes")]
    TooLarge { name: String, path: PathBuf },
    #[error("secret {name:?} at {path} is not UTF-8 text")]
    NotText { name: String, path: PathBuf },
}

/// Reads the declared secrets of one job from `dir`, now (so a rotated file is seen by the
/// next job). One trailing newline (`\n` or `\r\n`) is dropped, as `$(cat file)` would.
pub fn read_for_job(dir: Option<&Path>, names: &[String]) -> Result<JobSecrets, SecretError> {
    let mut values = Vec::with_capacity(names.len());
    for name in names {
        let Some(dir) = dir else {
            return Err(SecretError::NoDir { name: name.clone() });
        };
        let path = dir.join(name);
        let unreadable = |source| SecretError::Unreadable {
            name: name.clone(),
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(unreadable)?;
        let mut bytes = Vec::new();
        file.take(MAX_SECRET_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(unreadable)?;
        if bytes.len() as u64 > MAX_SECRET_BYTES {
            return Err(SecretError::TooLarge {
                name: name.clone(),
                path,
            });
        }
        let mut text = String::from_utf8(bytes).map_err(|_| SecretError::NotText {
            name: name.clone(),
            path: path.clone(),
        })?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        values.push((name.clone(), text));
    }
    Ok(JobSecrets { values })
}

/// The granted path through which a job's sandbox would reach `dir` (the folder lies under
/// it, or it under the folder), if any: the secrets folder must be outside everything
/// Landlock grants a job.
pub fn exposed_by<'a>(
    dir: &Path,
    granted: impl IntoIterator<Item = &'a PathBuf>,
) -> Option<PathBuf> {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let dir = canonical(dir);
    granted
        .into_iter()
        .map(|g| canonical(g))
        .find(|g| dir.starts_with(g) || g.starts_with(&dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_file_names() {
        for good in ["db-password", "api_key", "cert.pem", "A1"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "..data",
            "a/b",
            "../x",
            "/etc/passwd",
            "a b",
            "x\0",
        ] {
            let err = check_name(bad).expect_err(bad);
            assert!(err.contains("secret name"), "{err}");
        }
        assert!(check_name(&"x".repeat(128)).is_err());
    }

    #[test]
    fn scopes_are_uris() {
        assert!(check_scope("https://storage.azure.com/.default").is_ok());
        assert!(check_scope("api://my-app/.default").is_ok());
        for bad in ["storage", "http://x/.default", "https://a b", ""] {
            assert!(check_scope(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_are_read_at_each_call_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("token"), "first\n").expect("write");
        let names = vec!["token".to_owned()];
        let got = read_for_job(Some(dir.path()), &names).expect("read");
        assert_eq!(got.values, vec![("token".into(), "first".into())]);
        std::fs::write(dir.path().join("token"), "rotated\r\n").expect("write");
        let got = read_for_job(Some(dir.path()), &names).expect("read");
        assert_eq!(got.values[0].1, "rotated");
        assert!(!format!("{got:?}").contains("rotated"));
        let err = read_for_job(Some(dir.path()), &["absent".into()]).expect_err("missing");
        assert!(err.to_string().contains("\"absent\""), "{err}");
        let err = read_for_job(None, &names).expect_err("no dir");
        assert!(err.to_string().contains("secrets.dir"), "{err}");
        std::fs::write(dir.path().join("bin"), [0xff, 0xfe]).expect("write");
        assert!(matches!(
            read_for_job(Some(dir.path()), &["bin".into()]),
            Err(SecretError::NotText { .. })
        ));
    }

    #[test]
    fn a_folder_under_or_over_a_granted_path_is_exposed() {
        let granted = vec![PathBuf::from("/usr"), PathBuf::from("/srv/workers/w")];
        assert_eq!(
            exposed_by(Path::new("/usr/share/secrets"), &granted),
            Some(PathBuf::from("/usr"))
        );
        assert_eq!(
            exposed_by(Path::new("/srv"), &granted),
            Some(PathBuf::from("/srv/workers/w"))
        );
        assert_eq!(exposed_by(Path::new("/mnt/secrets"), &granted), None);
    }
}
