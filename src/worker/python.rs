//! Finding the real Python interpreter once.
//!
//! `python3` on PATH is often a shim (pyenv, asdf) that costs tens of milliseconds per start.
//! The daemon asks the configured command for `sys.executable` once, builds venvs from that
//! binary, and starts each job's venv interpreter by absolute path.

use std::path::PathBuf;
use std::process::Command;

/// A resolved interpreter: where it really is and its version (part of every venv key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpreter {
    pub path: PathBuf,
    /// `major.minor.micro`.
    pub version: String,
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
    #[error("the Python interpreter {command:?} failed to report its version: {detail}")]
    Probe { command: String, detail: String },
}

/// Kept to `sys` alone: importing `platform` would add ~40 ms to every resolution.
const PROBE: &str = "import sys; print(sys.executable); print('%d.%d.%d' % sys.version_info[:3])";

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
        let (Some(path), Some(version)) = (lines.next(), lines.next()) else {
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
        })
    }
}
