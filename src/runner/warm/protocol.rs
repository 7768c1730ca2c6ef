//! The messages between the daemon and a warm parent (`hybrid_worker/_zygote.py`), one JSON
//! object per `SOCK_SEQPACKET` packet, tagged by `t`; descriptors travel beside them as
//! `SCM_RIGHTS`. Typed here so that a field misspelt on either side fails to compile (or to
//! parse, said in the log) rather than reading as a default.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// From the daemon to the warm parent.
#[derive(Debug, Serialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub(super) enum Control<'a> {
    /// Once, after it started: the seccomp layer (hex) each child adds, and whether a job
    /// cgroup's `cgroup.procs` descriptor comes with it for the first spare child.
    Init { filters: String, cgroup: bool },
    /// Start one job in the spare child: its id, folder and complete environment; with it go
    /// the job's four pipe ends, then its Landlock ruleset (`landlock`), then the next spare's
    /// cgroup (`cgroup`).
    Fork {
        id: u64,
        cwd: &'a Path,
        env: serde_json::Map<String, serde_json::Value>,
        landlock: bool,
        cgroup: bool,
    },
    /// Signal the process group of job `id`.
    Kill { id: u64, sig: i32 },
}

/// From the warm parent to the daemon.
#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub(super) enum Reply {
    /// Its imports are done: which preloads worked and which failed (a child imports those
    /// again and reports the failure as the job's), and the Python threads it runs.
    Ready {
        #[serde(default)]
        preloaded: Vec<String>,
        #[serde(default)]
        failed: Vec<String>,
        #[serde(default)]
        threads: Vec<String>,
    },
    /// Job `id` runs as `pid`.
    Started { id: u64, pid: i32 },
    /// Job `id` could not be forked.
    Failed { id: u64, error: String },
    /// Job `id`'s process ended, with its `wait4` accounting.
    Exited {
        id: u64,
        code: Option<i32>,
        signal: Option<i32>,
        #[serde(default)]
        cpu_ms: u64,
        #[serde(default)]
        max_rss_kb: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_the_shape_the_python_side_reads() {
        let kill = serde_json::to_value(Control::Kill { id: 3, sig: 15 }).expect("json");
        assert_eq!(kill, serde_json::json!({"t": "kill", "id": 3, "sig": 15}));
        let fork = serde_json::to_value(Control::Fork {
            id: 1,
            cwd: Path::new("/tmp/j"),
            env: serde_json::Map::new(),
            landlock: true,
            cgroup: false,
        })
        .expect("json");
        assert_eq!(fork["t"], "fork");
        assert_eq!(fork["cwd"], "/tmp/j");
        let exited: Reply = serde_json::from_str(
            r#"{"t": "exited", "id": 7, "code": null, "signal": 9, "cpu_ms": 12, "max_rss_kb": 900}"#,
        )
        .expect("parses");
        assert!(matches!(
            exited,
            Reply::Exited {
                id: 7,
                code: None,
                signal: Some(9),
                cpu_ms: 12,
                max_rss_kb: 900
            }
        ));
        assert!(serde_json::from_str::<Reply>(r#"{"t": "nonsense"}"#).is_err());
    }
}
