//! The daemon-wide part of the sandbox: the `[sandbox]` configuration section, and which of its
//! mechanisms an operator requires (`sandbox.require`).

use serde::{Deserialize, Serialize};

use super::Enforced;
use super::cgroup::CgroupSetting;

/// The daemon-wide part of the sandbox, from the `[sandbox]` configuration section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    /// The uid jobs run as when the daemon runs as root (65534, `nobody`, by default).
    pub user: u32,
    /// The gid jobs run as when the daemon runs as root.
    pub group: u32,
    /// How many uids, from `user` up, running jobs take turns with: with one per running job,
    /// `RLIMIT_NPROC` (which counts per uid) is each job's own, and jobs cannot signal each
    /// other. More running jobs than uids share the first one.
    pub users: u32,
    /// Where job cgroups are made: `auto` (the daemon's own cgroup v2 folder, when writable),
    /// `off`, or a cgroup v2 folder's path (the daemon refuses to start if it cannot use it).
    pub cgroup: CgroupSetting,
    /// Mechanisms ([`MECHANISMS`], or `all`) that must be on for every worker: `run` and
    /// `exec` refuse to start (exit 2) naming each one that is off here and why, so that a
    /// weakened sandbox is never silent in production.
    #[serde(default)]
    pub require: Vec<String>,
}

/// The mechanisms `sandbox.require` may name, as [`Enforced::mechanism`] spells them with `_`
/// for spaces.
pub const MECHANISMS: &[&str] = &[
    "user",
    "rlimits",
    "processes",
    "oom_score_adj",
    "no_new_privs",
    "seccomp",
    "landlock",
    "cgroup",
    "cgroup_memory",
    "cgroup_pids",
    "netns",
];

/// Whether `sandbox.require` (`required`) names `mechanism` (as [`Enforced`] spells it).
pub fn is_required(required: &[String], mechanism: &str) -> bool {
    let name = mechanism.replace(' ', "_");
    required.iter().any(|r| r == "all" || *r == name)
}

/// The required mechanisms that `enforcement` reports off, each as `name: why`.
pub fn unmet(required: &[String], enforcement: &[Enforced]) -> Vec<String> {
    enforcement
        .iter()
        .filter(|e| !e.on && is_required(required, e.mechanism))
        .map(|e| format!("{}: {}", e.mechanism.replace(' ', "_"), e.detail))
        .collect()
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            user: 65534,
            group: 65534,
            users: 1,
            cgroup: CgroupSetting::Auto,
            require: Vec::new(),
        }
    }
}
