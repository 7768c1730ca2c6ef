//! Pinned virtualenvs: one per worker, outside the source tree, keyed by a hash of the worker's
//! `requirements.txt`, the Python version and the interpreter's path (a worker pinned to another
//! Python, `python = "3.12"`, gets another venv; see `docs/workers.md`).
//!
//! A venv is complete only when its lock file (`hybrid-worker.lock.json`) is written, which is
//! the last step of a build; so an interrupted build reads as missing, never as ready. The
//! engine only *checks* venvs: building is `hybrid-worker workers build`, never the job path.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Worker;
use super::python::Interpreter;

/// The lock file inside a venv that records what it was built from.
pub const LOCK_FILE: &str = "hybrid-worker.lock.json";

#[derive(Debug, thiserror::Error)]
pub enum VenvError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason} (every requirement needs ==version and --hash=sha256:…)")]
    Unpinned {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("building the venv of worker {worker} failed at `{step}`: {detail}")]
    Build {
        worker: String,
        step: String,
        detail: String,
    },
}

/// What a venv was built from; equal locks mean an equal venv.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VenvLock {
    pub worker: String,
    pub key: String,
    pub requirements_sha256: String,
    pub python_version: String,
    /// The interpreter the venv was built from (after any copy for the job user).
    #[serde(default)]
    pub python_path: PathBuf,
    /// The worker's `python` pin, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python_requirement: Option<String>,
    pub installer: String,
}

/// Where a worker's venv stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VenvState {
    /// Built from the current requirements and Python: jobs can run.
    Ready { dir: PathBuf, python: PathBuf },
    /// No complete venv for the current key; `stale` names an older one if there is one.
    Missing {
        expected: PathBuf,
        stale: Option<PathBuf>,
    },
}

impl VenvState {
    pub fn is_ready(&self) -> bool {
        matches!(self, VenvState::Ready { .. })
    }
}

/// The venv a worker should have under `root` for `python`.
#[derive(Debug, Clone)]
pub struct VenvPlan {
    pub worker: String,
    pub dir: PathBuf,
    pub lock: VenvLock,
    pub requirements: PathBuf,
    /// How many requirement lines there are (0: nothing to install).
    pub requirement_count: usize,
}

impl VenvPlan {
    /// Reads the worker's requirements, checks they are pinned, and computes the key.
    pub fn new(worker: &Worker, python: &Interpreter, root: &Path) -> Result<VenvPlan, VenvError> {
        let requirements = worker.requirements_path();
        let bytes = std::fs::read(&requirements).map_err(|source| VenvError::Io {
            path: requirements.clone(),
            source,
        })?;
        let requirement_count = check_pinned(&requirements, &String::from_utf8_lossy(&bytes))?;
        let requirements_sha256 = hex::encode(Sha256::digest(&bytes));
        let mut hasher = Sha256::new();
        hasher.update(requirements_sha256.as_bytes());
        hasher.update(b"\0");
        hasher.update(python.version.as_bytes());
        // A venv's interpreter is a link to its base: another base (a copy, another install of
        // the same version) is another venv.
        hasher.update(b"\0");
        hasher.update(python.path.as_os_str().as_encoded_bytes());
        let key = hex::encode(hasher.finalize())[..16].to_owned();
        Ok(VenvPlan {
            worker: worker.name.clone(),
            dir: root.join(format!("{}-{key}", worker.name)),
            lock: VenvLock {
                worker: worker.name.clone(),
                key,
                requirements_sha256,
                python_version: python.version.clone(),
                python_path: python.path.clone(),
                python_requirement: worker.spec.python.as_ref().map(ToString::to_string),
                installer: String::new(),
            },
            requirements,
            requirement_count,
        })
    }

    pub fn python(&self) -> PathBuf {
        self.dir.join("bin").join("python")
    }

    /// Checks the venv on disk against the plan.
    pub fn state(&self) -> VenvState {
        let lock: Option<VenvLock> = std::fs::read(self.dir.join(LOCK_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let matches = lock.is_some_and(|l| {
            l.key == self.lock.key
                && l.requirements_sha256 == self.lock.requirements_sha256
                && l.python_version == self.lock.python_version
        });
        if matches && self.python().exists() {
            return VenvState::Ready {
                dir: self.dir.clone(),
                python: self.python(),
            };
        }
        VenvState::Missing {
            expected: self.dir.clone(),
            stale: self.others().into_iter().next(),
        }
    }

    /// Other venvs of the same worker under the same root (older keys).
    fn others(&self) -> Vec<PathBuf> {
        let Some(root) = self.dir.parent() else {
            return Vec::new();
        };
        let prefix = format!("{}-", self.worker);
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p != &self.dir)
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(&prefix))
                    .is_some_and(|rest| {
                        rest.len() == 16 && rest.chars().all(|c| c.is_ascii_hexdigit())
                    })
            })
            .collect()
    }

    /// Builds the venv: with `uv` when it is on PATH, else `python -m venv` and pip in
    /// hash-checking mode. `progress` receives a line per step. Older venvs of the worker are
    /// removed once the new one is complete.
    pub fn build(&self, python: &Interpreter, progress: &dyn Fn(&str)) -> Result<(), VenvError> {
        let fail = |step: &str, detail: String| VenvError::Build {
            worker: self.worker.clone(),
            step: step.to_owned(),
            detail,
        };
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)
                .map_err(|e| fail("remove the incomplete venv", e.to_string()))?;
        }
        if let Some(root) = self.dir.parent() {
            std::fs::create_dir_all(root)
                .map_err(|e| fail("create the venv root", e.to_string()))?;
        }
        let uv = find_on_path("uv");
        let installer = if uv.is_some() { "uv" } else { "pip" };
        progress(&format!("creating the venv with {installer}"));
        let dir = self.dir.to_string_lossy().into_owned();
        let interp = python.path.to_string_lossy().into_owned();
        match &uv {
            Some(uv) => run(uv, &["venv", "--quiet", "--python", &interp, &dir])
                .map_err(|e| fail("uv venv", e))?,
            None => {
                let mut args = vec!["-m", "venv"];
                if self.requirement_count == 0 {
                    args.push("--without-pip");
                }
                args.push(&dir);
                run(&python.path, &args).map_err(|e| fail("python -m venv", e))?
            }
        }
        if self.requirement_count > 0 {
            progress(&format!(
                "installing {} pinned requirement(s) in hash-checking mode",
                self.requirement_count
            ));
            let reqs = self.requirements.to_string_lossy().into_owned();
            let venv_python = self.python().to_string_lossy().into_owned();
            match &uv {
                Some(uv) => run(
                    uv,
                    &[
                        "pip",
                        "install",
                        "--quiet",
                        "--require-hashes",
                        "--no-deps",
                        "--python",
                        &venv_python,
                        "-r",
                        &reqs,
                    ],
                )
                .map_err(|e| fail("uv pip install", e))?,
                None => run(
                    self.python(),
                    &[
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--require-hashes",
                        "--no-deps",
                        "--no-input",
                        "--disable-pip-version-check",
                        "-r",
                        &reqs,
                    ],
                )
                .map_err(|e| fail("pip install", e))?,
            }
        }
        let lock = VenvLock {
            installer: installer.to_owned(),
            ..self.lock.clone()
        };
        let body =
            serde_json::to_vec_pretty(&lock).map_err(|e| fail("write the lock", e.to_string()))?;
        std::fs::write(self.dir.join(LOCK_FILE), body)
            .map_err(|e| fail("write the lock", e.to_string()))?;
        for old in self.others() {
            progress(&format!("removing the older venv {}", old.display()));
            // A leftover old venv only costs disk; it can never be used, so failure is not fatal.
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(())
    }
}

/// Checks hash-checking mode's rules on every requirement line and counts them.
fn check_pinned(path: &Path, text: &str) -> Result<usize, VenvError> {
    let mut count = 0;
    // Continuation lines (`\`) belong to the requirement above.
    let joined = text.replace("\\\r\n", " ").replace("\\\n", " ");
    for (index, raw) in joined.lines().enumerate() {
        let line = raw.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let unpinned = |reason: &str| VenvError::Unpinned {
            path: path.to_path_buf(),
            line: index + 1,
            reason: reason.to_owned(),
        };
        if line.starts_with('-') {
            return Err(unpinned(
                "options are not allowed in a worker's requirements",
            ));
        }
        let spec = line.split_whitespace().next().unwrap_or("");
        if !spec.contains("==") {
            return Err(unpinned(&format!("{spec:?} is not pinned with ==")));
        }
        if !line.contains("--hash=sha256:") {
            return Err(unpinned(&format!("{spec:?} has no --hash=sha256:")));
        }
        count += 1;
    }
    Ok(count)
}

fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Result<(), String> {
    let program = program.as_ref();
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", program.to_string_lossy()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
    Err(format!(
        "{} ({})\n{}",
        out.status,
        program.to_string_lossy(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    ))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_must_be_pinned_with_hashes() {
        let p = Path::new("requirements.txt");
        assert_eq!(check_pinned(p, "# nothing\n\n").expect("empty"), 0);
        let ok = "six==1.17.0 \\\n    --hash=sha256:abc\nx==1 --hash=sha256:def # why\n";
        assert_eq!(check_pinned(p, ok).expect("pinned"), 2);
        let err = check_pinned(p, "six>=1\n")
            .expect_err("unpinned")
            .to_string();
        assert!(err.contains(":1:") && err.contains("not pinned"), "{err}");
        let err = check_pinned(p, "# c\nsix==1.0\n")
            .expect_err("no hash")
            .to_string();
        assert!(err.contains(":2:") && err.contains("no --hash"), "{err}");
        assert!(check_pinned(p, "--index-url x\n").is_err());
    }
}
