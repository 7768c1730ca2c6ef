//! What the sandbox enforces for a worker's jobs on this kernel, one line per mechanism, for the
//! start-up log, `workers verify` and `sandbox.require`. Nothing is skipped silently.

use super::cgroup::{self, Cgroups};
use super::{JobUser, MAX_FILE_BYTES, MAX_OPEN_FILES, NetAccess, SandboxPolicy, landlock, seccomp};
use crate::worker::NetworkPolicy;

/// One mechanism's state on this daemon, for start-up logs and `workers verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enforced {
    pub mechanism: &'static str,
    /// False when the mechanism is not enforced here; `detail` then says why.
    pub on: bool,
    pub detail: String,
}

impl SandboxPolicy {
    /// True when the job runs as a dedicated user, so `RLIMIT_NPROC` counts only jobs.
    pub(super) fn dedicated_user(&self) -> bool {
        self.mechanisms.user && matches!(self.user, JobUser::Drop { .. })
    }

    /// Each mechanism, and whether and how it is enforced for this worker on this kernel.
    pub fn enforcement(&self) -> Vec<Enforced> {
        let mut out = vec![
            self.user_line(),
            self.rlimits_line(),
            self.processes_line(),
            on(
                "oom_score_adj",
                "1000: the OOM killer picks the job, never the daemon".into(),
            ),
            if self.mechanisms.no_new_privs {
                on(
                    "no_new_privs",
                    "exec gains no privilege (setuid files and file capabilities are ignored)"
                        .into(),
                )
            } else {
                off("no_new_privs", "turned off".into())
            },
            self.seccomp_line(),
            self.landlock_line(),
        ];
        out.extend(cgroup::enforcement(
            &self.cgroups,
            &self.limits,
            self.mechanisms.cgroup,
        ));
        out.push(self.netns_line());
        out
    }

    fn user_line(&self) -> Enforced {
        let missing = &self.support.missing_root_capabilities;
        if self.mechanisms.user {
            match &self.user {
                JobUser::Drop { .. } if !missing.is_empty() => off(
                    "user",
                    format!(
                        "uid 0 without {}: jobs could neither be started as another uid nor stopped",
                        missing.join(", ")
                    ),
                ),
                JobUser::Same { uid } => on(
                    "user",
                    format!("the daemon's own uid {uid} (not root: nothing to drop)"),
                ),
                JobUser::Drop { uid, gid } if self.users > 1 => on(
                    "user",
                    format!(
                        "uids {uid}-{} (one per running job) gid {gid}",
                        uid.saturating_add(self.users - 1)
                    ),
                ),
                JobUser::Drop { uid, gid } => on("user", format!("uid {uid} gid {gid}")),
                JobUser::RootWithoutCapabilities { uid, blocked } => off(
                    "user",
                    format!(
                        "uid 0 with no capabilities: uid {uid} cannot reach {} (build venvs from an interpreter outside root-only folders)",
                        blocked.display()
                    ),
                ),
            }
        } else {
            off("user", "turned off".into())
        }
    }

    fn rlimits_line(&self) -> Enforced {
        let l = &self.limits;
        if self.mechanisms.rlimits {
            on(
                "rlimits",
                format!(
                    "address space {} MiB, CPU {} s, open files {MAX_OPEN_FILES}, file size {} MiB, no core dumps",
                    l.memory_mb,
                    l.cpu_s,
                    MAX_FILE_BYTES >> 20
                ),
            )
        } else {
            off("rlimits", "turned off".into())
        }
    }

    fn processes_line(&self) -> Enforced {
        let (l, m) = (&self.limits, &self.mechanisms);
        if m.rlimits && self.dedicated_user() {
            on(
                "processes",
                if self.users > 1 {
                    format!(
                        "RLIMIT_NPROC {} for the job's own uid (shared only past {} running jobs)",
                        l.max_processes, self.users
                    )
                } else {
                    format!(
                        "RLIMIT_NPROC {} for the job user (shared by its concurrent jobs; see sandbox.users)",
                        l.max_processes
                    )
                },
            )
        } else {
            let pids_max =
                matches!(&self.cgroups, Cgroups::On(root) if root.pids.is_on()) && m.cgroup;
            let instead = if pids_max {
                "; the job cgroup's pids.max bounds them instead"
            } else {
                ""
            };
            off(
            "processes",
            match self.user {
                JobUser::Same { .. } if pids_max => format!(
                    "jobs share the daemon's uid, whose threads RLIMIT_NPROC would count{instead}"
                ),
                JobUser::Same { .. } => "jobs share the daemon's uid, whose threads RLIMIT_NPROC would count; set a pids limit on the pod".into(),
                _ => format!("jobs run as uid 0, which RLIMIT_NPROC does not limit{instead}"),
            },
        )
        }
    }

    fn seccomp_line(&self) -> Enforced {
        match (self.mechanisms.seccomp, self.support.seccomp) {
            (false, _) => off("seccomp", "turned off".into()),
            (true, false) => off("seccomp", "the kernel has no seccomp".into()),
            (true, true) => on(
                "seccomp",
                format!(
                    "EPERM for {} calls (ptrace, mount, bpf, unshare, keyctl, setsid, io_uring…); sockets: {}",
                    seccomp::denied_names().count(),
                    match self.net_access() {
                        NetAccess::Deny => "AF_UNIX only",
                        NetAccess::Allow => "all but AF_PACKET",
                        NetAccess::Proxy { .. } => "AF_UNIX and IPv4 TCP only (no UDP)",
                    }
                ),
            ),
        }
    }

    fn landlock_line(&self) -> Enforced {
        match (self.mechanisms.landlock, &self.support.landlock_abi) {
            (false, _) => off("landlock", "turned off".into()),
            (true, Err(why)) => off(
                "landlock",
                format!("{why}: the job can read and write whatever its uid can"),
            ),
            (true, Ok(abi)) => on("landlock", landlock::features(*abi)),
        }
    }

    /// The `netns` line: for a worker with an egress list, whether its jobs get a network
    /// namespace holding only loopback (where the kernel gives them no route but to the
    /// proxy), or what narrows them instead; with the list itself, for audits.
    fn netns_line(&self) -> Enforced {
        let on_here = self.mechanisms.netns;
        let rules = match &self.limits.network {
            NetworkPolicy::List(_) => self.limits.network.to_string(),
            _ if !on_here => return off("netns", "turned off".into()),
            other => return on("netns", format!("not needed: network = \"{other}\"")),
        };
        let support = if on_here {
            crate::egress::netns::support().clone()
        } else {
            Err("turned off".into())
        };
        match support {
            Ok(()) => on(
                "netns",
                format!(
                    "jobs reach only the daemon's egress proxy, from a network namespace holding only loopback; allowed: {rules}"
                ),
            ),
            Err(why) => {
                let landlock_tcp = self.mechanisms.landlock
                    && matches!(&self.support.landlock_abi, Ok(abi) if *abi >= 4);
                let instead = if landlock_tcp {
                    "Landlock lets jobs connect over TCP only to the proxy's port (of any address), seccomp only TCP sockets"
                } else {
                    "NOTHING in the kernel keeps jobs from dialling around the proxy (no Landlock ABI 4)"
                };
                off(
                    "netns",
                    format!("{why}; instead {instead}; allowed: {rules}"),
                )
            }
        }
    }
}

fn on(mechanism: &'static str, detail: String) -> Enforced {
    Enforced {
        mechanism,
        on: true,
        detail,
    }
}

fn off(mechanism: &'static str, detail: String) -> Enforced {
    Enforced {
        mechanism,
        on: false,
        detail,
    }
}
