//! One job's cgroup: made with the worker's limits, entered by the job's process through a
//! descriptor the daemon opened, killed whole at the job's end, its usage read, and removed.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::*;

impl CgroupRoot {
    /// The values a job of a worker with `limits` gets, as far as the controllers go.
    pub fn job_limits(&self, limits: &Limits) -> JobLimits {
        let memory = self.memory.on();
        JobLimits {
            memory_max: memory.map(|_| limits.memory_mb.saturating_mul(1024 * 1024)),
            swap_off: memory.is_some_and(|m| m.swap.is_on()),
            oom_group: memory.is_some(),
            pids_max: self.pids.is_on().then_some(limits.max_processes),
        }
    }

    /// Makes one job's cgroup with its limits, and opens its `cgroup.procs` for the job's
    /// process to enter by.
    pub fn create_job(self: &Arc<Self>, limits: &Limits) -> Result<JobCgroup, CgroupError> {
        self.sweep_leftovers();
        // One counter for the whole process: every root of this process (a test makes several,
        // one per sandbox setting) names its job cgroups with the same owner tag.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("{JOB_PREFIX}{}-{n}", self.owner));
        std::fs::create_dir(&dir).map_err(|source| CgroupError::Create {
            path: dir.clone(),
            source,
        })?;
        let ready = write_limits(&dir, &self.job_limits(limits)).and_then(|()| open_procs(&dir));
        match ready {
            Ok(procs) => Ok(JobCgroup {
                dir,
                procs,
                root: self.clone(),
                removed: false,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// Removes the job cgroups that were still busy when their jobs ended, where they now can.
    pub(super) fn sweep_leftovers(&self) {
        let mut leftovers = self.leftovers.lock().unwrap_or_else(|e| e.into_inner());
        leftovers.retain(|dir| {
            kill_tree(dir, self.kill);
            match std::fs::remove_dir(dir) {
                Ok(()) => {
                    tracing::info!(cgroup = %dir.display(), "Removed a job cgroup that had been busy.");
                    false
                }
                Err(e) => e.kind() != std::io::ErrorKind::NotFound,
            }
        });
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`. A single write,
/// so it is safe between fork and exec.
pub fn enter(procs: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: writes one byte from a static buffer to a descriptor the caller holds.
    let written = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
    if written == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Kills every process in the cgroup `dir` and its descendants, waits (bounded) until they
/// are gone, and removes the cgroups, deepest first.
pub(super) fn remove_tree(dir: &Path) -> std::io::Result<()> {
    let kill = if dir.join("cgroup.kill").exists() {
        KillMethod::CgroupKill
    } else {
        KillMethod::EachProcess
    };
    kill_tree(dir, kill);
    let started = Instant::now();
    while populated(dir) && started.elapsed() < EMPTY_WAIT {
        std::thread::sleep(POLL);
        kill_tree(dir, kill);
    }
    for entry in std::fs::read_dir(dir)?.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// SIGKILL to every process of the cgroup `dir` and its descendants.
pub(super) fn kill_tree(dir: &Path, kill: KillMethod) {
    match kill {
        // Also kills the descendants' processes. ENOENT (already removed) is fine. Written only
        // when something is left: the write blocks forks through the whole hierarchy and waits
        // for an RCU grace period (~10 ms when cgroup changes are rare), and a cgroup with no
        // process can gain none (nothing is left in it to fork).
        KillMethod::CgroupKill => {
            if populated(dir) {
                let _ = write_file(&dir.join("cgroup.kill"), "1");
            }
        }
        KillMethod::EachProcess => {
            for pid in read_words(&dir.join("cgroup.procs")) {
                if let Ok(pid) = pid.parse() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    kill_tree(&entry.path(), kill);
                }
            }
        }
    }
}

/// True while the cgroup `dir` or a descendant holds a process (`populated` of
/// `cgroup.events`, or a non-empty `cgroup.procs` where there is no such file).
pub(super) fn populated(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events
            .lines()
            .any(|l| l.split_whitespace().eq(["populated", "1"])),
        Err(_) => !read_words(&dir.join("cgroup.procs")).is_empty(),
    }
}

/// Writes a job's limits into its cgroup `dir`.
pub fn write_limits(dir: &Path, limits: &JobLimits) -> Result<(), CgroupError> {
    let values = [
        ("memory.max", limits.memory_max.map(|v| v.to_string())),
        ("memory.swap.max", limits.swap_off.then(|| "0".to_owned())),
        ("memory.oom.group", limits.oom_group.then(|| "1".to_owned())),
        ("pids.max", limits.pids_max.map(|v| v.to_string())),
    ];
    for (file, value) in values {
        if let Some(value) = value {
            let path = dir.join(file);
            write_file(&path, &value).map_err(|source| CgroupError::Write {
                path,
                value,
                source,
            })?;
        }
    }
    Ok(())
}

/// The job's memory events and peak, from the files of its cgroup `dir` (zero or `None` where
/// a file is missing).
pub fn read_usage(dir: &Path) -> CgroupUsage {
    let events = std::fs::read_to_string(dir.join("memory.events")).unwrap_or_default();
    let event = |name: &str| {
        events
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    };
    CgroupUsage {
        oom_kills: event("oom_kill"),
        oom_group_kills: event("oom_group_kill"),
        memory_peak_bytes: std::fs::read_to_string(dir.join("memory.peak"))
            .ok()
            .and_then(|s| s.trim().parse().ok()),
    }
}

pub(super) fn open_procs(dir: &Path) -> Result<OwnedFd, CgroupError> {
    let path = dir.join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map(OwnedFd::from)
        .map_err(|source| CgroupError::Open { path, source })
}

/// One write of `value` to an existing file, as cgroup files want.
pub(super) fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// The whitespace-separated words of a file; none when it cannot be read.
pub(super) fn read_words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// One job's cgroup, from before its process starts until after everything in it is dead.
/// Dropping it without [`JobCgroup::finish`] kills what is in it and removes it where it can.
#[derive(Debug)]
pub struct JobCgroup {
    dir: PathBuf,
    /// Its `cgroup.procs`, opened by the daemon: the job's process enters by writing `0`.
    procs: OwnedFd,
    root: Arc<CgroupRoot>,
    removed: bool,
}

impl JobCgroup {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The descriptor the job's process enters the cgroup by ([`enter`]).
    pub fn procs(&self) -> BorrowedFd<'_> {
        self.procs.as_fd()
    }

    /// SIGKILL to every process still in the cgroup, whatever its process group or session.
    pub fn kill(&self) {
        kill_tree(&self.dir, self.root.kill);
    }

    /// Kills what is left and reads what the cgroup recorded; a background task removes it
    /// once it is empty (waiting at most 2 s; a cgroup still busy then is removed at a later
    /// job, or by the next daemon, and logged).
    pub async fn finish(mut self) -> CgroupUsage {
        self.kill();
        // What the cgroup recorded (OOM kills, peak memory) is final once its processes are
        // killed; the wait for them to be gone, and the removal, are off the job's path.
        let usage = read_usage(&self.dir);
        tokio::spawn(async move {
            let started = Instant::now();
            while populated(&self.dir) && started.elapsed() < EMPTY_WAIT {
                tokio::time::sleep(POLL).await;
                if self.root.kill == KillMethod::EachProcess {
                    self.kill();
                }
            }
            self.remove();
        });
        usage
    }

    fn remove(&mut self) {
        self.removed = true;
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(cgroup = %self.dir.display(), error = %e, "Could not remove a job's cgroup; it will be removed at a later job.");
                self.root
                    .leftovers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(self.dir.clone());
            }
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        if !self.removed {
            self.kill();
            self.remove();
        }
    }
}
