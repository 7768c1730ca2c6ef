//! A worker's interpreter pin: `python = "3.12"` in `worker.toml`, and finding an interpreter
//! on the host that satisfies it.
//!
//! Two workers can need two Pythons, and a newer one can be worth having on its own (3.12's
//! immortal objects spare a forked child the copy-on-write of CPython's static objects; see
//! `docs/workers.md`). The pin is a version requirement, not a path: it is resolved where the
//! daemon runs, in the order a developer's machine usually holds interpreters — uv's managed
//! Pythons (`uv python find`), pyenv's versions folder, then `python3.X` and `python3` on
//! `PATH` — and every candidate is asked for its real version before it is taken. A pin that
//! nothing satisfies is refused with the command that installs a match.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::python::{Interpreter, PythonError};

/// A version: `major.minor.micro`, with the parts a requirement left out as `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    major: u32,
    minor: Option<u32>,
    micro: Option<u32>,
}

impl Version {
    fn parse(text: &str) -> Option<Version> {
        let mut parts = text.split('.');
        let mut number = || -> Option<Option<u32>> {
            match parts.next() {
                None => Some(None),
                Some(p)
                    if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() < 6 =>
                {
                    p.parse().ok().map(Some)
                }
                Some(_) => None,
            }
        };
        let major = number()??;
        let minor = number()?;
        let micro = number()?;
        if parts.next().is_some() || (minor.is_none() && micro.is_some()) {
            return None;
        }
        Some(Version {
            major,
            minor,
            micro,
        })
    }

    /// The parts as a tuple, a missing part counting as 0 (`3.12` is `3.12.0`).
    fn padded(self) -> (u32, u32, u32) {
        (self.major, self.minor.unwrap_or(0), self.micro.unwrap_or(0))
    }

    /// Whether `full` starts with every part this version gives.
    fn is_prefix_of(self, full: Version) -> bool {
        self.major == full.major
            && self.minor.is_none_or(|m| Some(m) == full.minor)
            && self.micro.is_none_or(|m| Some(m) == full.micro)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.major)?;
        if let Some(minor) = self.minor {
            write!(f, ".{minor}")?;
        }
        if let Some(micro) = self.micro {
            write!(f, ".{micro}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `3.12`, `3.12.*`, `==3.12`, `==3.12.1`: every part given must be equal.
    Matches,
    NotMatches,
    Greater,
    GreaterOrEqual,
    Less,
    LessOrEqual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Clause {
    op: Op,
    version: Version,
}

impl Clause {
    fn parse(text: &str) -> Option<Clause> {
        let text = text.trim();
        let (op, rest) = [
            ("==", Op::Matches),
            ("!=", Op::NotMatches),
            (">=", Op::GreaterOrEqual),
            ("<=", Op::LessOrEqual),
            (">", Op::Greater),
            ("<", Op::Less),
        ]
        .into_iter()
        .find_map(|(token, op)| text.strip_prefix(token).map(|rest| (op, rest.trim())))
        .unwrap_or((Op::Matches, text));
        let (rest, wildcard) = match rest.strip_suffix(".*") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        // A wildcard only makes sense for equality (PEP 440).
        if wildcard && !matches!(op, Op::Matches | Op::NotMatches) {
            return None;
        }
        Some(Clause {
            op,
            version: Version::parse(rest)?,
        })
    }

    fn admits(self, full: Version) -> bool {
        let order = full.padded().cmp(&self.version.padded());
        match self.op {
            Op::Matches => self.version.is_prefix_of(full),
            Op::NotMatches => !self.version.is_prefix_of(full),
            Op::Greater => order == Ordering::Greater,
            Op::GreaterOrEqual => order != Ordering::Less,
            Op::Less => order == Ordering::Less,
            Op::LessOrEqual => order != Ordering::Greater,
        }
    }
}

/// `python = "…"` in `worker.toml`: one or more comma-separated clauses, all of which an
/// interpreter's `major.minor.micro` must satisfy: `3.12`, `3.12.1`, `3.12.*`, `==3.12`,
/// `>=3.12`, `>=3.11,<3.13`, `!=3.12.0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PythonRequirement {
    text: String,
    clauses: Vec<Clause>,
}

impl TryFrom<String> for PythonRequirement {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let refuse = |why: &str| {
            format!(
                "python = {text:?} is not a Python version requirement ({why}; write e.g. \"3.12\", \"3.12.1\", \"3.12.*\" or \">=3.12\")"
            )
        };
        if text.trim().is_empty() {
            return Err(refuse("it is empty"));
        }
        let clauses = text
            .split(',')
            .map(Clause::parse)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| refuse("each part is an optional ==, !=, >=, <=, > or < and a version of 1 to 3 numbers"))?;
        if clauses.iter().any(|c| c.version.major != 3) {
            return Err(refuse("workers run on Python 3"));
        }
        Ok(PythonRequirement {
            text: text.trim().to_owned(),
            clauses,
        })
    }
}

impl From<PythonRequirement> for String {
    fn from(r: PythonRequirement) -> String {
        r.text
    }
}

impl fmt::Display for PythonRequirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PythonRequirement {
    /// Whether an interpreter of `version` (`major.minor.micro`) satisfies every clause.
    pub fn admits(&self, version: &str) -> bool {
        Version::parse(version)
            .filter(|v| v.micro.is_some())
            .is_some_and(|v| self.clauses.iter().all(|c| c.admits(v)))
    }

    /// Whether some `major.minor` series could satisfy it (for names like `python3.12` or a
    /// pyenv folder `3.12.1`, before asking the interpreter itself).
    fn may_admit_series(&self, major: u32, minor: u32) -> bool {
        (0..100).any(|micro| {
            let v = Version {
                major,
                minor: Some(minor),
                micro: Some(micro),
            };
            self.clauses.iter().all(|c| c.admits(v))
        })
    }

    /// The version to name in an install command: the first version the requirement gives
    /// (`>=3.12` installs 3.12, `3.12.1` installs 3.12.1).
    pub fn install_version(&self) -> String {
        let positive = self
            .clauses
            .iter()
            .find(|c| !matches!(c.op, Op::NotMatches | Op::Less | Op::LessOrEqual))
            .or_else(|| self.clauses.first());
        positive.map_or_else(|| "3".to_owned(), |c| c.version.to_string())
    }
}

/// Where interpreters are looked for; [`Places::from_env`] reads the process's environment,
/// tests give their own.
#[derive(Debug, Clone, Default)]
pub struct Places {
    /// `PATH`'s folders, in order.
    pub path: Vec<PathBuf>,
    /// pyenv's root (`PYENV_ROOT`, else `~/.pyenv`), whose `versions/` holds its builds.
    pub pyenv_root: Option<PathBuf>,
    /// The `uv` executable, when there is one on `PATH`.
    pub uv: Option<PathBuf>,
}

impl Places {
    pub fn from_env() -> Places {
        let path: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        let pyenv_root = std::env::var_os("PYENV_ROOT")
            .filter(|r| !r.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")));
        let uv = path.iter().map(|d| d.join("uv")).find(|c| c.is_file());
        Places {
            path,
            pyenv_root,
            uv,
        }
    }

    /// The command that installs an interpreter for `requirement` with what this host has.
    pub fn install_command(&self, requirement: &PythonRequirement) -> String {
        let version = requirement.install_version();
        let has_pyenv = self.pyenv_root.as_ref().is_some_and(|r| r.is_dir())
            || self.path.iter().any(|d| d.join("pyenv").is_file());
        if self.uv.is_some() {
            format!("uv python install {version}")
        } else if has_pyenv {
            format!("pyenv install {version}")
        } else {
            format!(
                "uv python install {version} (install uv first), pyenv install {version}, or your system's python{version} package"
            )
        }
    }

    /// The interpreter that satisfies `requirement`: uv's choice first, then the newest
    /// matching pyenv build, then `python3.X` and `python3` on `PATH`. Every candidate is
    /// probed ([`Interpreter::resolve`]); one whose real version does not match is skipped.
    pub fn find(&self, requirement: &PythonRequirement) -> Result<Interpreter, PythonError> {
        let mut searched = Vec::new();
        if let Some(uv) = &self.uv {
            searched.push(format!("`{} python find --system`", uv.display()));
            if let Some(found) = uv_find(uv, requirement).and_then(|p| probe(&p, requirement)) {
                return Ok(found);
            }
        }
        if let Some(root) = &self.pyenv_root {
            let versions = root.join("versions");
            searched.push(versions.display().to_string());
            for dir in pyenv_candidates(&versions, requirement) {
                let found = ["python3", "python"]
                    .iter()
                    .find_map(|name| probe(&dir.join("bin").join(name), requirement));
                if let Some(found) = found {
                    return Ok(found);
                }
            }
        }
        searched.push("python3.X and python3 on PATH".to_owned());
        for candidate in path_candidates(&self.path, requirement) {
            if let Some(found) = probe(&candidate, requirement) {
                return Ok(found);
            }
        }
        Err(PythonError::NotFound {
            requirement: requirement.to_string(),
            searched: searched.join(", "),
            fix: self.install_command(requirement),
        })
    }
}

/// The interpreter at `path` when it runs and its version satisfies `requirement`.
fn probe(path: &Path, requirement: &PythonRequirement) -> Option<Interpreter> {
    if !path.is_file() {
        return None;
    }
    let found = Interpreter::resolve(&path.to_string_lossy()).ok()?;
    if requirement.admits(&found.version) {
        Some(found)
    } else {
        tracing::debug!(candidate = %path.display(), version = %found.version, %requirement, "An interpreter does not satisfy the worker's python pin.");
        None
    }
}

/// `uv python find --system <requirement>`: the path uv chose, if it found one.
fn uv_find(uv: &Path, requirement: &PythonRequirement) -> Option<PathBuf> {
    let out = Command::new(uv)
        .args(["python", "find", "--system", &requirement.to_string()])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?.trim();
    (out.status.success() && !line.is_empty()).then(|| PathBuf::from(line))
}

/// pyenv builds named like a CPython release (`3.12.1`; not `3.13.0t`, `pypy3.10-7.3`,
/// `miniconda3`) whose name satisfies `requirement`, newest first.
fn pyenv_candidates(versions: &Path, requirement: &PythonRequirement) -> Vec<PathBuf> {
    let mut found: Vec<((u32, u32, u32), PathBuf)> = std::fs::read_dir(versions)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let v = Version::parse(&name).filter(|v| v.micro.is_some())?;
            requirement.admits(&name).then(|| (v.padded(), e.path()))
        })
        .collect();
    found.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
    found.into_iter().map(|(_, p)| p).collect()
}

/// `python3.X` files on `PATH` whose series may satisfy `requirement` (newest series first,
/// earlier `PATH` folders first within a series), then each `python3`.
fn path_candidates(path: &[PathBuf], requirement: &PythonRequirement) -> Vec<PathBuf> {
    let mut versioned: Vec<(u32, usize, PathBuf)> = Vec::new();
    let mut plain = Vec::new();
    for (index, dir) in path.iter().enumerate() {
        for entry in std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
        {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name == "python3" {
                plain.push(entry.path());
            } else if let Some(minor) = name
                .strip_prefix("python3.")
                .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|m| m.parse::<u32>().ok())
                && requirement.may_admit_series(3, minor)
            {
                versioned.push((minor, index, entry.path()));
            }
        }
    }
    versioned.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    versioned
        .into_iter()
        .map(|(_, _, p)| p)
        .chain(plain)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn req(text: &str) -> PythonRequirement {
        PythonRequirement::try_from(text.to_owned()).expect(text)
    }

    #[test]
    fn requirements_accept_the_usual_forms() {
        for (text, yes, no) in [
            ("3.12", "3.12.1", "3.13.0"),
            ("3.12.1", "3.12.1", "3.12.2"),
            ("3.12.*", "3.12.0", "3.11.9"),
            ("==3.12", "3.12.7", "3.1.2"),
            (">=3.12", "3.13.0", "3.11.7"),
            (">3.12", "3.12.1", "3.12.0"),
            ("<3.13", "3.12.9", "3.13.0"),
            ("<=3.12", "3.12.0", "3.12.1"),
            (">=3.11, <3.13", "3.11.7", "3.13.0"),
            ("!=3.12.0", "3.12.1", "3.12.0"),
            ("3", "3.9.18", "2.7.18"),
        ] {
            let r = req(text);
            assert!(r.admits(yes), "{text} admits {yes}");
            assert!(!r.admits(no), "{text} refuses {no}");
        }
    }

    #[test]
    fn bad_requirements_are_refused_with_the_reason() {
        for (text, why) in [
            ("", "empty"),
            ("latest", "version of 1 to 3 numbers"),
            ("3.12.1.4", "version of 1 to 3 numbers"),
            (">=3.12.*", "version of 1 to 3 numbers"),
            ("~=3.12", "version of 1 to 3 numbers"),
            ("2.7", "Python 3"),
            ("3.x", "version of 1 to 3 numbers"),
        ] {
            let err = PythonRequirement::try_from(text.to_owned()).expect_err(text);
            assert!(
                err.contains(why) && err.contains("\"3.12\""),
                "{text}: {err}"
            );
        }
    }

    /// A fake interpreter: a shell script answering the probe with its own path, `version`
    /// and its folder's parent as the prefix.
    fn fake_python(path: &Path, version: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let prefix = path.parent().and_then(Path::parent).expect("prefix");
        std::fs::write(
            path,
            format!(
                "#!/bin/sh\necho {}\necho {version}\necho {}\n",
                path.display(),
                prefix.display()
            ),
        )
        .expect("script");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn pyenv_builds_come_before_path_and_the_newest_match_wins() {
        let root = tempfile::tempdir().expect("tmp");
        let pyenv = root.path().join("pyenv");
        for v in ["3.11.7", "3.12.1", "3.12.4", "3.13.0"] {
            fake_python(&pyenv.join("versions").join(v).join("bin/python3"), v);
        }
        // Not CPython release names: never taken.
        fake_python(&pyenv.join("versions/3.12.9t/bin/python3"), "3.12.9");
        let bin = root.path().join("bin");
        fake_python(&bin.join("python3.12"), "3.12.3");
        let places = Places {
            path: vec![bin.clone()],
            pyenv_root: Some(pyenv.clone()),
            uv: None,
        };
        let found = places.find(&req("3.12")).expect("found");
        assert_eq!(found.version, "3.12.4");
        assert_eq!(found.path, pyenv.join("versions/3.12.4/bin/python3"));
        assert_eq!(found.prefix, pyenv.join("versions/3.12.4"));
        assert_eq!(places.find(&req(">=3.13")).expect("13").version, "3.13.0");
        assert_eq!(
            places.find(&req("3.12.1")).expect("exact").version,
            "3.12.1"
        );
        // Without pyenv, PATH's python3.12.
        let places = Places {
            pyenv_root: None,
            ..places
        };
        assert_eq!(
            places.find(&req("3.12")).expect("path").path,
            bin.join("python3.12")
        );
    }

    #[test]
    fn path_is_searched_by_name_then_by_asking_python3() {
        let root = tempfile::tempdir().expect("tmp");
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        fake_python(&a.join("python3"), "3.11.2");
        fake_python(&a.join("python3.11"), "3.11.2");
        // A python3.13 that is really something else is skipped after probing.
        fake_python(&a.join("python3.13"), "3.12.0");
        fake_python(&b.join("python3"), "3.13.1");
        let places = Places {
            path: vec![a.clone(), b.clone()],
            pyenv_root: Some(root.path().join("no-pyenv")),
            uv: None,
        };
        assert_eq!(
            places.find(&req("3.11")).expect("11").path,
            a.join("python3.11")
        );
        // python3.13 lies; a's python3 is 3.11; b's python3 is the one.
        assert_eq!(
            places.find(&req("3.13")).expect("13").path,
            b.join("python3")
        );
    }

    #[test]
    fn a_missing_interpreter_names_the_command_that_installs_it() {
        let root = tempfile::tempdir().expect("tmp");
        let pyenv = root.path().join("pyenv");
        fake_python(&pyenv.join("versions/3.11.7/bin/python3"), "3.11.7");
        let places = Places {
            path: vec![],
            pyenv_root: Some(pyenv.clone()),
            uv: None,
        };
        let err = places.find(&req("3.12")).expect_err("none").to_string();
        assert!(err.contains("`pyenv install 3.12`"), "{err}");
        assert!(
            err.contains(&pyenv.join("versions").display().to_string()),
            "{err}"
        );
        let uv = Places {
            uv: Some(root.path().join("uv")),
            ..places
        };
        assert_eq!(
            uv.install_command(&req(">=3.13,<3.14")),
            "uv python install 3.13"
        );
        let bare = Places::default();
        assert!(
            bare.install_command(&req("3.12"))
                .starts_with("uv python install 3.12")
        );
    }
}
