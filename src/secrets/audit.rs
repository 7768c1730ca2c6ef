//! What `workers verify` and the start-up report say about a worker's secrets: whether the
//! secrets folder is set and holds the declared names, and whether the worker's jobs could
//! reach it (through a path their Landlock rules grant, or by its permissions where Landlock
//! is off). docs/secrets.md lists the findings and what each makes the daemon do.

use std::path::{Path, PathBuf};

use super::exposed_by;
use crate::sandbox::{JobUser, SandboxPolicy, unreachable_part};
use crate::worker::Worker;

/// How grave a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Said, nothing refused.
    Warning,
    /// `workers verify` fails; `run` warns and starts (the worker's jobs fail with
    /// `PolicyDenied`, naming the secret).
    Error,
    /// Jobs could read secrets: `run` and `exec` refuse to start, `workers verify` fails.
    Refuse,
}

/// One thing the audit found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub text: String,
}

fn finding(level: Level, text: String) -> Finding {
    Finding { level, text }
}

/// The findings about `worker`'s secrets, its jobs confined by `policy`. A worker declaring
/// no secrets has none. (Each job's own temp folder, the one other path it is granted, is
/// made fresh and empty, so it never holds the secrets folder.)
pub fn audit(worker: &Worker, secrets_dir: Option<&Path>, policy: &SandboxPolicy) -> Vec<Finding> {
    let names = &worker.spec.secrets;
    if names.is_empty() {
        return Vec::new();
    }
    let Some(dir) = secrets_dir else {
        return vec![finding(
            Level::Error,
            format!(
                "declares secrets {names:?} but secrets.dir (HYBRID__SECRETS__DIR) is not set: its jobs fail with PolicyDenied"
            ),
        )];
    };
    if !dir.is_dir() {
        return vec![finding(
            Level::Error,
            format!(
                "secrets.dir {} is not a folder here: its jobs fail with PolicyDenied",
                dir.display()
            ),
        )];
    }
    let mut found = Vec::new();
    let granted = policy.fs.read_only.iter().chain(&policy.fs.read_write);
    if let Some(path) = exposed_by(dir, granted) {
        found.push(finding(
            Level::Refuse,
            format!(
                "secrets.dir {} overlaps {}, which the worker's jobs may read: move the secrets folder out of every path jobs are granted",
                dir.display(),
                path.display()
            ),
        ));
    }
    let landlock = policy
        .enforcement()
        .iter()
        .any(|e| e.mechanism == "landlock" && e.on);
    if let Some(who) = readable_by_jobs(dir, &policy.user) {
        let (level, rest) = if landlock {
            (
                Level::Warning,
                "only Landlock keeps jobs out (make it readable by the daemon's user alone, mode 0700, where jobs run as another user)",
            )
        } else {
            (
                Level::Refuse,
                "and Landlock is off here: jobs could read every secret",
            )
        };
        found.push(finding(
            level,
            format!(
                "{who} can read secrets.dir {} by its permissions; {rest}",
                dir.display()
            ),
        ));
    }
    for name in names {
        let path: PathBuf = dir.join(name);
        if !path.is_file() {
            found.push(finding(
                Level::Warning,
                format!(
                    "secret {name:?} is missing at {}: its jobs fail with PolicyDenied until it appears",
                    path.display()
                ),
            ));
        }
    }
    found
}

/// Who among the jobs' users can read `dir` by its permissions, if any.
fn readable_by_jobs(dir: &Path, user: &JobUser) -> Option<String> {
    match user {
        JobUser::Drop { uid, gid } => unreachable_part(dir, *uid, *gid)
            .is_none()
            .then(|| format!("the job user {uid}")),
        JobUser::Same { uid } => Some(format!("the jobs (running as the daemon's uid {uid})")),
        JobUser::RootWithoutCapabilities { .. } => Some("the jobs (staying uid 0)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{Sandbox, SandboxSettings};

    fn worker(dir: &Path, secrets: &[&str]) -> Worker {
        std::fs::write(dir.join("worker.toml"), "entrypoint = \"m:f\"\n").expect("write");
        std::fs::write(dir.join("requirements.txt"), "").expect("write");
        let mut w = Worker::load(dir).expect("load");
        w.spec.secrets = secrets.iter().map(|s| s.to_string()).collect();
        w
    }

    #[test]
    fn a_secrets_folder_inside_a_granted_path_refuses_and_missing_names_warn() {
        let root = tempfile::tempdir().expect("tmp");
        let wdir = root.path().join("w");
        std::fs::create_dir_all(&wdir).expect("mkdir");
        let w = worker(&wdir, &["db", "api"]);
        let sandbox = Sandbox::new(SandboxSettings::default()).expect("sandbox");
        let python = Path::new("/usr/bin/python3");
        let temp = root.path().join("tmp");
        let policy = sandbox.policy(&w, python, &root.path().join("rt"), &temp);

        // Inside the worker's folder, which jobs read.
        let inside = wdir.join("secrets");
        std::fs::create_dir_all(&inside).expect("mkdir");
        std::fs::write(inside.join("db"), "x").expect("write");
        let found = audit(&w, Some(&inside), &policy);
        assert!(
            found
                .iter()
                .any(|f| f.level == Level::Refuse && f.text.contains("overlaps")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|f| f.level == Level::Warning && f.text.contains("\"api\" is missing")),
            "{found:?}"
        );

        // Apart from everything granted: only the missing name (and the permissions note).
        let apart = tempfile::tempdir().expect("tmp");
        std::fs::write(apart.path().join("db"), "x").expect("write");
        std::fs::write(apart.path().join("api"), "x").expect("write");
        let found = audit(&w, Some(apart.path()), &policy);
        assert!(
            found.iter().all(|f| !f.text.contains("overlaps")),
            "{found:?}"
        );
        if matches!(policy.user, JobUser::Drop { .. }) {
            // A root daemon: the job user is another uid, kept out by a 0700 folder.
            use std::os::unix::fs::PermissionsExt;
            let mode = |m| std::fs::Permissions::from_mode(m);
            std::fs::set_permissions(apart.path(), mode(0o700)).expect("chmod");
            assert!(audit(&w, Some(apart.path()), &policy).is_empty());
            std::fs::set_permissions(apart.path(), mode(0o755)).expect("chmod");
            let found = audit(&w, Some(apart.path()), &policy);
            assert!(
                found.iter().any(|f| f.text.contains("by its permissions")),
                "{found:?}"
            );
        }

        let found = audit(&w, None, &policy);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].level, Level::Error);
        assert!(found[0].text.contains("HYBRID__SECRETS__DIR"));
        assert!(audit(&worker(&wdir, &[]), None, &policy).is_empty());
    }
}
