//! Making the folder usable once per daemon: room for controllers (the daemon's own leaf),
//! `+memory` and `+pids` for job cgroups, a probe of what job cgroups can do and whether the
//! job's user can enter one, and the removal of job cgroups whose daemon is gone. Job cgroup
//! names carry their daemon's pid and start time ([`owner_tag`]) for that.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Mutex;

use super::*;

/// This daemon's mark in the names of its job cgroups: its pid and the kernel's start time of
/// it, so that a later daemon can tell a live owner from a dead one even after pid reuse.
pub fn owner_tag() -> Result<String, String> {
    let pid = std::process::id();
    let start =
        start_time(pid).ok_or_else(|| "cannot read this process's start time".to_owned())?;
    Ok(format!("{pid}-{start}"))
}

/// Field 22 (start time, in clock ticks since boot) of `/proc/<pid>/stat`.
pub(super) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The owner of a job cgroup's name, `job-<pid>-<start>-<n>`, when it is one of ours.
pub(super) fn owner_of(name: &str) -> Option<(u32, u64)> {
    let mut parts = name.strip_prefix(JOB_PREFIX)?.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((pid, start))
}

impl CgroupRoot {
    /// Steps 2 to 5 of the module's set-up, on `dir`; the error says why it cannot be used.
    pub(super) fn prepare(dir: &Path, job_user: Option<(u32, u32)>) -> Result<CgroupRoot, String> {
        let on_cgroup2 = nix::sys::statfs::statfs(dir)
            .map_err(|e| format!("{}: {}", dir.display(), std::io::Error::from(e)))?
            .filesystem_type()
            == nix::sys::statfs::CGROUP2_SUPER_MAGIC;
        if !on_cgroup2 {
            return Err(format!("{} is not a cgroup v2 folder", dir.display()));
        }
        let euid = nix::unistd::geteuid();
        if let Err(e) = nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK) {
            return Err(format!(
                "{} is not writable by uid {euid} ({e}): no cgroup is delegated to the daemon",
                dir.display()
            ));
        }
        // The root of a hierarchy has no `cgroup.type`, and may hold processes and give
        // controllers to its children at once.
        let hierarchy_root = !dir.join("cgroup.type").exists();
        let own = own_cgroup().ok();
        let leaf = dir.join(DAEMON_LEAF);
        let mut daemon_leaf = None;
        let mut busy = None;
        if own.as_deref() == Some(leaf.as_path()) {
            daemon_leaf = Some(leaf);
        } else if own.as_deref() == Some(dir) && !hierarchy_root {
            match move_daemon(dir, &leaf) {
                Ok(()) => daemon_leaf = Some(leaf),
                Err(why) => busy = Some(why),
            }
        }
        let available = read_words(&dir.join("cgroup.controllers"));
        let enabled = read_words(&dir.join("cgroup.subtree_control"));
        let in_v1 =
            v1_controllers(&std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
        let controller = |name: &str| -> Result<(), String> {
            if !available.iter().any(|c| c == name) {
                return Err(format!(
                    "controller not available in {} (has: {}){}",
                    dir.display(),
                    if available.is_empty() {
                        "none".to_owned()
                    } else {
                        available.join(" ")
                    },
                    if in_v1.iter().any(|c| c == name) {
                        "; this host mounts it as cgroup v1 (a hybrid hierarchy), which job cgroups do not use"
                    } else {
                        ""
                    }
                ));
            }
            if enabled.iter().any(|c| c == name) {
                return Ok(());
            }
            if let Some(why) = &busy {
                return Err(why.clone());
            }
            let control = dir.join("cgroup.subtree_control");
            write_file(&control, &format!("+{name}")).map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => format!(
                    "{} holds processes, and cgroup v2 gives controllers only to the children of a cgroup without processes of its own",
                    dir.display()
                ),
                _ => format!("cannot enable it in {}: {e}", control.display()),
            })
        };
        let memory = controller("memory");
        let pids = controller("pids");
        let owner = owner_tag()?;
        remove_stale(dir, &owner);

        let probe = dir.join(format!("{JOB_PREFIX}{owner}-probe"));
        if probe.exists() {
            let _ = remove_tree(&probe);
        }
        std::fs::create_dir(&probe)
            .map_err(|e| format!("cannot create a cgroup in {}: {e}", dir.display()))?;
        let probed = probe_job_cgroup(&probe, memory, pids, job_user);
        if let Err(e) = remove_tree(&probe) {
            tracing::warn!(cgroup = %probe.display(), error = %e, "Could not remove the probe cgroup.");
        }
        let Probed { memory, pids, kill } = probed?;
        Ok(CgroupRoot {
            dir: dir.to_path_buf(),
            daemon_leaf,
            memory,
            pids,
            kill,
            owner,
            leftovers: Mutex::new(Vec::new()),
        })
    }

    /// A root for the unit tests: `dir` need not be a cgroup.
    #[cfg(test)]
    pub(super) fn fake(
        dir: &Path,
        memory: Result<MemoryFiles, String>,
        pids: Result<(), String>,
    ) -> Self {
        CgroupRoot {
            dir: dir.to_path_buf(),
            daemon_leaf: None,
            memory: memory.into(),
            pids: pids.into(),
            kill: KillMethod::CgroupKill,
            owner: "1-2".into(),
            leftovers: Mutex::new(Vec::new()),
        }
    }
}

/// Moves this process into `leaf`, so that `dir` holds no process; refused when other
/// processes are in `dir` too (moving only the daemon would not free it).
pub(super) fn move_daemon(dir: &Path, leaf: &Path) -> Result<(), String> {
    let me = std::process::id();
    let others: Vec<String> = read_words(&dir.join("cgroup.procs"))
        .into_iter()
        .filter(|p| p.parse() != Ok(me))
        .collect();
    if !others.is_empty() {
        return Err(format!(
            "{} holds other processes than the daemon (pids {}), and cgroup v2 gives controllers only to the children of a cgroup without processes of its own: run the daemon as its cgroup's only process, or set sandbox.cgroup to a folder of its own",
            dir.display(),
            others.iter().take(5).cloned().collect::<Vec<_>>().join(" ")
        ));
    }
    match std::fs::create_dir(leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", leaf.display())),
    }
    // "0" is the writing process, all of its threads.
    write_file(&leaf.join("cgroup.procs"), "0")
        .map_err(|e| format!("cannot move the daemon into {}: {e}", leaf.display()))?;
    tracing::info!(
        leaf = %leaf.display(),
        "The daemon moved itself into a leaf cgroup, so that its job cgroups can have controllers."
    );
    Ok(())
}

/// What a probe found job cgroups offer here.
#[derive(Debug)]
pub(super) struct Probed {
    memory: Support<MemoryFiles>,
    pids: Support,
    kill: KillMethod,
}

/// What a job cgroup (`probe`, just made) offers, given the controllers' states; an error when
/// job cgroups cannot be used at all.
pub(super) fn probe_job_cgroup(
    probe: &Path,
    memory: Result<(), String>,
    pids: Result<(), String>,
    job_user: Option<(u32, u32)>,
) -> Result<Probed, String> {
    let has = |file: &str| probe.join(file).exists();
    let memory = memory.and_then(|()| {
        if !(has("memory.max") && has("memory.oom.group")) {
            return Err(format!(
                "{} has no memory.max or memory.oom.group (Linux 4.19+)",
                probe.display()
            ));
        }
        Ok(MemoryFiles {
            swap: if has("memory.swap.max") {
                Support::On(())
            } else {
                Support::Off("no memory.swap.max (swap accounting is off)".into())
            },
            peak: has("memory.peak"),
        })
    });
    let pids = pids.and_then(|()| {
        if has("pids.max") {
            Ok(())
        } else {
            Err(format!("{} has no pids.max", probe.display()))
        }
    });
    let kill = if has("cgroup.kill") {
        KillMethod::CgroupKill
    } else {
        KillMethod::EachProcess
    };
    let procs = open_procs(probe).map_err(|e| e.to_string())?;
    enter_from_child(procs.as_fd(), None)
        .map_err(|e| format!("a process cannot be moved into {}: {e}", probe.display()))?;
    if let Some((uid, gid)) = job_user {
        enter_from_child(procs.as_fd(), Some((uid, gid))).map_err(|e| {
            format!(
                "a process of the job user (uid {uid}) cannot enter a job cgroup through the daemon's descriptor ({e}); that needs Linux 5.16+ or a kernel with the CVE-2021-4197 fix"
            )
        })?;
    }
    Ok(Probed {
        memory: memory.into(),
        pids: pids.into(),
        kill,
    })
}

/// Forks a child that (as `user`, when given) writes `0` to `procs`, as a job's process does,
/// and says whether that worked.
pub(super) fn enter_from_child(
    procs: BorrowedFd<'_>,
    user: Option<(u32, u32)>,
) -> std::io::Result<()> {
    const SETUID_FAILED: libc::c_int = 255;
    let fd = procs.as_raw_fd();
    // SAFETY: the child only makes async-signal-safe system calls (setgroups, setresgid,
    // setresuid, write, _exit) on values computed before the fork, and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; the child leaves with _exit, skipping every destructor.
        unsafe {
            if let Some((uid, gid)) = user
                && (libc::setgroups(0, std::ptr::null()) < 0
                    || libc::setresgid(gid, gid, gid) < 0
                    || libc::setresuid(uid, uid, uid) < 0)
            {
                libc::_exit(SETUID_FAILED);
            }
            let code = match enter(BorrowedFd::borrow_raw(fd)) {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
            };
            libc::_exit(code);
        }
    }
    let status = loop {
        match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.map_err(std::io::Error::from)?,
        }
    };
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        nix::sys::wait::WaitStatus::Exited(_, SETUID_FAILED) => Err(std::io::Error::other(
            "the probe could not take the job user's uid",
        )),
        nix::sys::wait::WaitStatus::Exited(_, errno) => {
            Err(std::io::Error::from_raw_os_error(errno))
        }
        other => Err(std::io::Error::other(format!(
            "the probe process ended as {other:?}"
        ))),
    }
}

/// Kills and removes the job cgroups in `dir` whose daemon is gone.
pub(super) fn remove_stale(dir: &Path, own: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, start)) = owner_of(&name) else {
            continue;
        };
        if format!("{pid}-{start}") == own || start_time(pid) == Some(start) {
            continue;
        }
        match remove_tree(&entry.path()) {
            Ok(()) => {
                tracing::info!(cgroup = %entry.path().display(), "Removed a job cgroup left by a daemon that is gone.")
            }
            Err(e) => {
                tracing::warn!(cgroup = %entry.path().display(), error = %e, "Could not remove a job cgroup left by a daemon that is gone.")
            }
        }
    }
}
