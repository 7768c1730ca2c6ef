//! Finding the real Python interpreter once.
//!
//! `python3` on PATH is often a shim (pyenv, asdf) that costs tens of milliseconds per start.
//! The daemon asks the configured command for `sys.executable` once, builds venvs from that
//! binary, and starts each job's venv interpreter by absolute path.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A resolved interpreter: where it really is and its version (part of every venv key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpreter {
    pub path: PathBuf,
    /// `major.minor.micro`.
    pub version: String,
    /// Its installation prefix (`sys.base_prefix`): the standard library and shared libraries.
    pub prefix: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error(
        "cannot start the Python interpreter {command:?}: {source} (install Python 3.9 or newer, or set HYBRID__WORKERS__PYTHON)"
    )]
    Start {
        command: String,
        source: std::io::Error,
    },
    #[error(
        "no Python interpreter satisfies python = {requirement:?} (searched {searched}); install one: `{fix}`"
    )]
    NotFound {
        requirement: String,
        searched: String,
        fix: String,
    },
    #[error("the Python interpreter {command:?} failed to report its version: {detail}")]
    Probe { command: String, detail: String },
    #[error(
        "jobs run as uid {uid}, which cannot reach the interpreter {path} ({blocked} is closed to it), and a copy it can read could not be made under workers.system_dir: {source}"
    )]
    Copy {
        uid: u32,
        path: PathBuf,
        blocked: PathBuf,
        source: super::relocate::RelocateError,
    },
}

/// Kept to modules loaded at start anyway: importing `platform` would add ~40 ms to every
/// resolution. The executable's links are resolved: a venv's `python` is a link to its base.
const PROBE: &str = "import os, sys; print(os.path.realpath(sys.executable)); \
                     print('%d.%d.%d' % sys.version_info[:3]); print(sys.base_prefix)";

impl Interpreter {
    /// Runs `command` once to learn the real executable and version.
    pub fn resolve(command: &str) -> Result<Interpreter, PythonError> {
        let out = Command::new(command)
            .args(["-I", "-c", PROBE])
            .output()
            .map_err(|source| PythonError::Start {
                command: command.to_owned(),
                source,
            })?;
        let probe_error = |detail: String| PythonError::Probe {
            command: command.to_owned(),
            detail,
        };
        if !out.status.success() {
            return Err(probe_error(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let (Some(path), Some(version), Some(prefix)) = (lines.next(), lines.next(), lines.next())
        else {
            return Err(probe_error(format!("unexpected output {text:?}")));
        };
        if path.is_empty() || !version.starts_with('3') {
            return Err(probe_error(format!(
                "needs Python 3, found executable {path:?} version {version:?}"
            )));
        }
        Ok(Interpreter {
            path: PathBuf::from(path),
            version: version.to_owned(),
            prefix: PathBuf::from(prefix),
        })
    }

    /// This interpreter, or, when this process is root and the job user `uid`:`gid` cannot
    /// reach it (a pyenv build under `/root`), a copy of its prefix under `system_dir` that it
    /// can ([`super::relocate`]). Jobs of a root daemon then run as that user, never as root.
    pub fn for_jobs(self, uid: u32, gid: u32, system_dir: &Path) -> Result<Self, PythonError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(self);
        }
        let blocked = [&self.path, &self.prefix]
            .into_iter()
            .find_map(|p| crate::sandbox::unreachable_part(p, uid, gid));
        let Some(blocked) = blocked else {
            return Ok(self);
        };
        let (prefix, copy) =
            super::relocate::copy_interpreter(&self.prefix, &self.path, &self.version, system_dir)
                .map_err(|source| PythonError::Copy {
                    uid,
                    path: self.path.clone(),
                    blocked: blocked.clone(),
                    source,
                })?;
        tracing::info!(
            interpreter = %self.path.display(),
            copy = %copy.display(),
            uid,
            "Jobs run as an unprivileged user that cannot reach the interpreter; using a copy it can read."
        );
        Ok(Interpreter {
            path: copy,
            version: self.version,
            prefix,
        })
    }
}
