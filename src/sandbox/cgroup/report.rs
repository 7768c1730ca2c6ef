//! What job cgroups enforce here, for `workers verify` and the start-up log.

use super::{Cgroups, Enforced, JOB_PREFIX, KillMethod, Limits, Support};

/// The report of job cgroups for `workers verify` and the start-up log: `cgroup` (placement
/// and kill), `cgroup memory` and `cgroup pids`, each on or OFF with how or why.
pub fn enforcement(cgroups: &Cgroups, limits: &Limits, turned_on: bool) -> [Enforced; 3] {
    let row = |mechanism, on, detail: String| Enforced {
        mechanism,
        on,
        detail,
    };
    if !turned_on {
        return [
            row("cgroup", false, "turned off".into()),
            row("cgroup memory", false, "turned off".into()),
            row("cgroup pids", false, "turned off".into()),
        ];
    }
    let root = match cgroups {
        Cgroups::Off(why) => {
            let none = || "no job cgroups (see cgroup)".to_owned();
            return [
                row("cgroup", false, why.clone()),
                row("cgroup memory", false, none()),
                row("cgroup pids", false, none()),
            ];
        }
        Cgroups::On(root) => root,
    };
    let kill = match root.kill {
        KillMethod::CgroupKill => "cgroup.kill",
        KillMethod::EachProcess => {
            "SIGKILL to each process listed (no cgroup.kill before Linux 5.14: one forking at that instant can slip through)"
        }
    };
    let leaf = root
        .daemon_leaf
        .as_ref()
        .map(|l| format!("; the daemon itself is in {}", l.display()))
        .unwrap_or_default();
    let placement = row(
        "cgroup",
        true,
        format!(
            "{}/{JOB_PREFIX}*: placement before the job's first instruction + {kill} at its end (helpers that left its process group included){leaf}",
            root.dir.display()
        ),
    );
    let memory = match &root.memory {
        Support::On(files) => row(
            "cgroup memory",
            true,
            format!(
                "memory.max {} MiB, memory.oom.group 1 (an OOM kill takes the whole job, reported as MemoryLimit), {}",
                limits.memory_mb,
                match &files.swap {
                    Support::On(()) => "memory.swap.max 0".to_owned(),
                    Support::Off(why) => format!("swap not limited: {why}"),
                }
            ),
        ),
        Support::Off(why) => row("cgroup memory", false, why.clone()),
    };
    let pids = match &root.pids {
        Support::On(()) => row(
            "cgroup pids",
            true,
            format!(
                "pids.max {} (the job's processes and threads, whatever their uid)",
                limits.max_processes
            ),
        ),
        Support::Off(why) => row("cgroup pids", false, why.clone()),
    };
    [placement, memory, pids]
}
