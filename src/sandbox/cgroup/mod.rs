//! cgroup v2 per job: each job's processes in a cgroup of their own, with the worker's memory
//! and process limits where those controllers are delegated, killed whole when the job ends.
//!
//! Set up once per daemon ([`Cgroups::setup`], from `sandbox.cgroup`):
//! 1. the folder: `auto` is the process's own cgroup v2 folder (the `0::` line of
//!    `/proc/self/cgroup` under the cgroup2 mount of `/proc/self/mountinfo`), or its parent when
//!    the process already sits in the [`DAEMON_LEAF`] an earlier start made; a path is used as
//!    given;
//! 2. room for controllers: cgroup v2 lets a cgroup other than the hierarchy's root give
//!    controllers to its children only while it holds no process of its own, so a daemon that
//!    sits in the folder moves itself into the leaf `<folder>/daemon`, when it is the folder's
//!    only process (what systemd's `Delegate=yes` and container runtimes expect);
//! 3. `+memory` and `+pids` in the folder's `cgroup.subtree_control`, each when it has it;
//! 4. the `job-*` cgroups of a daemon that is gone are killed and removed;
//! 5. a probe cgroup tells which files job cgroups have, and whether a process, as the job's
//!    user, can enter one through a descriptor the daemon opened.
//!
//! What is missing turns off its own feature only, and [`enforcement`] reports each feature;
//! only a path the operator configured and that cannot be used stops the daemon.
//!
//! Per job ([`CgroupRoot::create_job`]): `<folder>/job-<daemon pid>-<its start time>-<n>` with
//! `memory.max`, `memory.swap.max` 0, `memory.oom.group` 1 and `pids.max`. The job's process
//! enters it before it runs anything of its own, by writing `0` to a descriptor of the cgroup's
//! `cgroup.procs` opened by the daemon: in spawn mode between fork and exec, before the uid drop;
//! in fork mode the descriptor goes to the warm parent with the job's pipes, and the forked child
//! writes to it first of all (the kernel checks a migration against the credentials of whoever
//! opened the file, Linux 5.16+, so a child that already runs as the job's user can). At the end
//! ([`JobCgroup::finish`]) everything left in the cgroup is killed (`cgroup.kill`, which reaches
//! helpers that left the process group), its memory events (an OOM kill makes the job
//! `MemoryLimit`) and peak are read, and the cgroup is removed once it is empty.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Enforced;
use crate::worker::Limits;

/// The leaf a daemon moves itself into, so that its folder may give controllers to job cgroups.
pub const DAEMON_LEAF: &str = "daemon";
/// Job cgroups are named `job-<owner>-<n>`, the owner being [`owner_tag`] of their daemon.
pub const JOB_PREFIX: &str = "job-";
/// How long a killed cgroup may take to empty before its removal is left for later.
const EMPTY_WAIT: Duration = Duration::from_secs(2);
/// How often an emptying cgroup is looked at.
const POLL: Duration = Duration::from_millis(5);

/// `sandbox.cgroup`: where job cgroups are made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CgroupSetting {
    /// The daemon's own cgroup v2 folder, when it is writable; off (reported) otherwise.
    #[default]
    Auto,
    /// No job cgroups.
    Off,
    /// This cgroup v2 folder; the daemon refuses to start when it cannot use it.
    Path(PathBuf),
}

impl TryFrom<String> for CgroupSetting {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.trim() {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            path if Path::new(path).is_absolute() => Ok(Self::Path(PathBuf::from(path))),
            other => Err(format!(
                "{other:?} is invalid: must be \"auto\", \"off\" or the absolute path of a cgroup v2 folder"
            )),
        }
    }
}

impl From<CgroupSetting> for String {
    fn from(setting: CgroupSetting) -> String {
        match setting {
            CgroupSetting::Auto => "auto".into(),
            CgroupSetting::Off => "off".into(),
            CgroupSetting::Path(path) => path.to_string_lossy().into_owned(),
        }
    }
}

/// Job cgroups could not be set up or made.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Only for a configured path: `auto` turns job cgroups off instead.
    #[error("configuration key `sandbox.cgroup` = {dir:?} cannot be used: {reason}")]
    Unusable { dir: PathBuf, reason: String },
    #[error("cannot create the job's cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {value} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether this daemon makes job cgroups, as [`Cgroups::setup`] found it.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// No job cgroups, and why.
    Off(String),
    On(Arc<CgroupRoot>),
}

/// How the processes left in a job cgroup are killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillMethod {
    /// `cgroup.kill` (Linux 5.14+): the kernel kills every process of the cgroup at once.
    CgroupKill,
    /// SIGKILL to each process `cgroup.procs` lists, again until none is left.
    EachProcess,
}

/// The memory controller's files in job cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryFiles {
    /// `memory.swap.max`, or why there is none (swap accounting off).
    pub swap: Result<(), String>,
    /// `memory.peak` (Linux 5.19+).
    pub peak: bool,
}

/// The folder job cgroups are made in, and what they can do there.
#[derive(Debug)]
pub struct CgroupRoot {
    pub dir: PathBuf,
    /// Where the daemon moved itself (or found itself) to keep `dir` free of processes.
    pub daemon_leaf: Option<PathBuf>,
    /// `memory.max` and `memory.oom.group` per job, or why not.
    pub memory: Result<MemoryFiles, String>,
    /// `pids.max` per job, or why not.
    pub pids: Result<(), String>,
    pub kill: KillMethod,
    /// This daemon's part of the job cgroups' names ([`owner_tag`]).
    owner: String,
    next: AtomicU64,
    /// Job cgroups that were still busy when their job ended; removed at a later job.
    leftovers: Mutex<Vec<PathBuf>>,
}

/// What a job cgroup recorded by the job's end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// `oom_kill` of `memory.events`: processes the OOM killer killed.
    pub oom_kills: u64,
    /// `oom_group_kill`: times `memory.oom.group` killed the whole cgroup.
    pub oom_group_kills: u64,
    /// `memory.peak`: the most memory the job's processes held at once, page cache included.
    pub memory_peak_bytes: Option<u64>,
}

impl CgroupUsage {
    /// True when the kernel's OOM killer acted inside the job's cgroup.
    pub fn oom_killed(&self) -> bool {
        self.oom_kills > 0 || self.oom_group_kills > 0
    }
}

/// The limits written into one job's cgroup; `None`/`false` where the controller is missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobLimits {
    pub memory_max: Option<u64>,
    pub swap_off: bool,
    pub oom_group: bool,
    pub pids_max: Option<u64>,
}

impl Cgroups {
    /// Finds and prepares the folder of job cgroups; once per process and setting (a second
    /// call returns the first answer: the daemon may have moved itself since).
    ///
    /// `job_user` is the uid and gid jobs run as when the daemon is root: the probe checks
    /// that a process of that user can enter a job cgroup, as a forked child must.
    pub fn setup(
        setting: &CgroupSetting,
        job_user: Option<(u32, u32)>,
    ) -> Result<Cgroups, CgroupError> {
        type Done = Vec<(CgroupSetting, Option<(u32, u32)>, Cgroups)>;
        static DONE: Mutex<Done> = Mutex::new(Vec::new());
        let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, cgroups)) = done
            .iter()
            .find(|(s, user, _)| s == setting && *user == job_user)
        {
            return Ok(cgroups.clone());
        }
        let cgroups = setup_uncached(setting, job_user)?;
        match &cgroups {
            Cgroups::On(root) => tracing::info!(
                dir = %root.dir.display(),
                memory = root.memory.is_ok(),
                pids = root.pids.is_ok(),
                "Job cgroups are on."
            ),
            Cgroups::Off(why) => tracing::info!(reason = %why, "Job cgroups are off."),
        }
        done.push((setting.clone(), job_user, cgroups.clone()));
        Ok(cgroups)
    }
}

fn setup_uncached(
    setting: &CgroupSetting,
    job_user: Option<(u32, u32)>,
) -> Result<Cgroups, CgroupError> {
    let (dir, explicit) = match setting {
        CgroupSetting::Off => {
            return Ok(Cgroups::Off("turned off (sandbox.cgroup = \"off\")".into()));
        }
        CgroupSetting::Auto => match own_cgroup() {
            Ok(own) => (delegated_from(&own), false),
            Err(why) => return Ok(Cgroups::Off(why)),
        },
        CgroupSetting::Path(path) => (path.clone(), true),
    };
    match CgroupRoot::prepare(&dir, job_user) {
        Ok(root) => Ok(Cgroups::On(Arc::new(root))),
        Err(reason) if explicit => Err(CgroupError::Unusable { dir, reason }),
        Err(reason) => Ok(Cgroups::Off(reason)),
    }
}

/// The folder to make job cgroups in when the process's own cgroup is `own`: its parent when
/// `own` is the leaf a daemon moved into (this process, or the one it was started beside).
fn delegated_from(own: &Path) -> PathBuf {
    match own.parent() {
        Some(parent) if own.file_name() == Some(DAEMON_LEAF.as_ref()) => parent.to_path_buf(),
        _ => own.to_path_buf(),
    }
}

/// The process's own cgroup v2 folder.
pub fn own_cgroup() -> Result<PathBuf, String> {
    let read =
        |path: &str| std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"));
    own_cgroup_in(&read("/proc/self/cgroup")?, &read("/proc/self/mountinfo")?)
}

/// [`own_cgroup`] from the texts of `/proc/self/cgroup` and `/proc/self/mountinfo`.
fn own_cgroup_in(cgroup: &str, mountinfo: &str) -> Result<PathBuf, String> {
    let own = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("the process is in no cgroup v2 hierarchy (cgroup v1 only)")?
        .trim();
    let (root, mount_point) = mountinfo
        .lines()
        .find_map(cgroup2_mount)
        .ok_or("cgroup v2 is not mounted")?;
    let relative = Path::new(own).strip_prefix(&root).map_err(|_| {
        format!(
            "the process's cgroup {own} is outside the cgroup2 mount at {} (which shows {})",
            mount_point.display(),
            root.display()
        )
    })?;
    Ok(if relative.as_os_str().is_empty() {
        mount_point
    } else {
        mount_point.join(relative)
    })
}

/// The root and mount point of a `mountinfo` line of a cgroup2 mount.
fn cgroup2_mount(line: &str) -> Option<(PathBuf, PathBuf)> {
    let (mount, filesystem) = line.split_once(" - ")?;
    if filesystem.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let mut fields = mount.split_whitespace();
    let root = fields.nth(3)?;
    let mount_point = fields.next()?;
    Some((
        PathBuf::from(unescape_mount(root)),
        PathBuf::from(unescape_mount(mount_point)),
    ))
}

/// Undoes the kernel's octal escapes (`\040` for a space) in mountinfo paths.
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| {
                let value = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                u8::try_from(value).ok()
            });
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This daemon's mark in the names of its job cgroups: its pid and the kernel's start time of
/// it, so that a later daemon can tell a live owner from a dead one even after pid reuse.
pub fn owner_tag() -> Result<String, String> {
    let pid = std::process::id();
    let start =
        start_time(pid).ok_or_else(|| "cannot read this process's start time".to_owned())?;
    Ok(format!("{pid}-{start}"))
}

/// Field 22 (start time, in clock ticks since boot) of `/proc/<pid>/stat`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The owner of a job cgroup's name, `job-<pid>-<start>-<n>`, when it is one of ours.
fn owner_of(name: &str) -> Option<(u32, u64)> {
    let mut parts = name.strip_prefix(JOB_PREFIX)?.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((pid, start))
}

impl CgroupRoot {
    /// Steps 2 to 5 of the module's set-up, on `dir`; the error says why it cannot be used.
    fn prepare(dir: &Path, job_user: Option<(u32, u32)>) -> Result<CgroupRoot, String> {
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
        let (memory, pids, kill) = probed?;
        Ok(CgroupRoot {
            dir: dir.to_path_buf(),
            daemon_leaf,
            memory,
            pids,
            kill,
            owner,
            next: AtomicU64::new(1),
            leftovers: Mutex::new(Vec::new()),
        })
    }

    /// A root for the unit tests: `dir` need not be a cgroup.
    #[cfg(test)]
    fn fake(dir: &Path, memory: Result<MemoryFiles, String>, pids: Result<(), String>) -> Self {
        CgroupRoot {
            dir: dir.to_path_buf(),
            daemon_leaf: None,
            memory,
            pids,
            kill: KillMethod::CgroupKill,
            owner: "1-2".into(),
            next: AtomicU64::new(1),
            leftovers: Mutex::new(Vec::new()),
        }
    }

    /// The values a job of a worker with `limits` gets, as far as the controllers go.
    pub fn job_limits(&self, limits: &Limits) -> JobLimits {
        let memory = self.memory.as_ref().ok();
        JobLimits {
            memory_max: memory.map(|_| limits.memory_mb.saturating_mul(1024 * 1024)),
            swap_off: memory.is_some_and(|m| m.swap.is_ok()),
            oom_group: memory.is_some(),
            pids_max: self.pids.is_ok().then_some(limits.max_processes),
        }
    }

    /// Makes one job's cgroup with its limits, and opens its `cgroup.procs` for the job's
    /// process to enter by.
    pub fn create_job(self: &Arc<Self>, limits: &Limits) -> Result<JobCgroup, CgroupError> {
        self.sweep_leftovers();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
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
    fn sweep_leftovers(&self) {
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

/// The controllers bound to cgroup v1 hierarchies, from the text of `/proc/self/cgroup`
/// (`4:memory:/…`; named hierarchies such as `name=systemd` are no controllers).
fn v1_controllers(cgroup: &str) -> Vec<String> {
    cgroup
        .lines()
        .filter_map(|l| {
            let mut fields = l.splitn(3, ':');
            let (id, controllers) = (fields.next()?, fields.next()?);
            (id != "0").then_some(controllers)
        })
        .flat_map(|c| c.split(','))
        .filter(|c| !c.is_empty() && !c.starts_with("name="))
        .map(str::to_owned)
        .collect()
}

/// Moves this process into `leaf`, so that `dir` holds no process; refused when other
/// processes are in `dir` too (moving only the daemon would not free it).
fn move_daemon(dir: &Path, leaf: &Path) -> Result<(), String> {
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

/// What a job cgroup (`probe`, just made) offers, given the controllers' states.
#[allow(clippy::type_complexity)]
fn probe_job_cgroup(
    probe: &Path,
    memory: Result<(), String>,
    pids: Result<(), String>,
    job_user: Option<(u32, u32)>,
) -> Result<(Result<MemoryFiles, String>, Result<(), String>, KillMethod), String> {
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
                Ok(())
            } else {
                Err("no memory.swap.max (swap accounting is off)".into())
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
    Ok((memory, pids, kill))
}

/// Forks a child that (as `user`, when given) writes `0` to `procs`, as a job's process does,
/// and says whether that worked.
fn enter_from_child(procs: BorrowedFd<'_>, user: Option<(u32, u32)>) -> std::io::Result<()> {
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

/// Kills and removes the job cgroups in `dir` whose daemon is gone.
fn remove_stale(dir: &Path, own: &str) {
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

/// Kills every process in the cgroup `dir` and its descendants, waits (bounded) until they
/// are gone, and removes the cgroups, deepest first.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
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
fn kill_tree(dir: &Path, kill: KillMethod) {
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
fn populated(dir: &Path) -> bool {
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

fn open_procs(dir: &Path) -> Result<OwnedFd, CgroupError> {
    let path = dir.join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map(OwnedFd::from)
        .map_err(|source| CgroupError::Open { path, source })
}

/// One write of `value` to an existing file, as cgroup files want.
fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// The whitespace-separated words of a file; none when it cannot be read.
fn read_words(path: &Path) -> Vec<String> {
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
        Ok(files) => row(
            "cgroup memory",
            true,
            format!(
                "memory.max {} MiB, memory.oom.group 1 (an OOM kill takes the whole job, reported as MemoryLimit), {}",
                limits.memory_mb,
                match &files.swap {
                    Ok(()) => "memory.swap.max 0".to_owned(),
                    Err(why) => format!("swap not limited: {why}"),
                }
            ),
        ),
        Err(why) => row("cgroup memory", false, why.clone()),
    };
    let pids = match &root.pids {
        Ok(()) => row(
            "cgroup pids",
            true,
            format!(
                "pids.max {} (the job's processes and threads, whatever their uid)",
                limits.max_processes
            ),
        ),
        Err(why) => row("cgroup pids", false, why.clone()),
    };
    [placement, memory, pids]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 24 0:28 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
34 24 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory
";

    #[test]
    fn the_own_cgroup_is_found_under_the_cgroup2_mount() {
        let cgroup = "4:memory:/x\n0::/system.slice/hybrid.service\n";
        assert_eq!(
            own_cgroup_in(cgroup, MOUNTINFO),
            Ok(PathBuf::from(
                "/sys/fs/cgroup/unified/system.slice/hybrid.service"
            ))
        );
        // The root itself, with no trailing slash.
        assert_eq!(
            own_cgroup_in("0::/\n", MOUNTINFO),
            Ok(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A mount of a sub-tree (a container without a cgroup namespace).
        let sub = "40 30 0:28 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            own_cgroup_in("0::/kubepods/pod1/c1\n", sub),
            Ok(PathBuf::from("/sys/fs/cgroup/c1"))
        );
        assert!(
            own_cgroup_in("0::/elsewhere\n", sub)
                .expect_err("outside")
                .contains("outside the cgroup2 mount")
        );
        assert!(
            own_cgroup_in("4:memory:/x\n", MOUNTINFO)
                .expect_err("v1")
                .contains("cgroup v1 only")
        );
        let v1_only = "34 24 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            own_cgroup_in("0::/\n", v1_only),
            Err("cgroup v2 is not mounted".into())
        );
    }

    #[test]
    fn controllers_bound_to_cgroup_v1_are_named() {
        let hybrid = "9:name=systemd:/\n8:pids:/\n2:cpu,cpuacct:/\n4:memory:/x\n0::/\n";
        assert_eq!(v1_controllers(hybrid), ["pids", "cpu", "cpuacct", "memory"]);
        assert_eq!(v1_controllers("0::/system.slice/x\n"), Vec::<String>::new());
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape_mount(r"/plain\09"), r"/plain\09");
        assert_eq!(unescape_mount(r"/end\"), r"/end\");
        assert_eq!(unescape_mount(r"/big\777"), r"/big\777");
    }

    #[test]
    fn a_daemon_leaf_means_its_parent_is_delegated() {
        assert_eq!(
            delegated_from(Path::new("/sys/fs/cgroup/app/daemon")),
            PathBuf::from("/sys/fs/cgroup/app")
        );
        assert_eq!(
            delegated_from(Path::new("/sys/fs/cgroup/app")),
            PathBuf::from("/sys/fs/cgroup/app")
        );
    }

    #[test]
    fn job_cgroup_names_carry_their_owner() {
        assert_eq!(owner_of("job-4242-99887766-17"), Some((4242, 99_887_766)));
        assert_eq!(
            owner_of("job-4242-99887766-probe"),
            Some((4242, 99_887_766))
        );
        assert_eq!(owner_of("job-4242-99887766"), None);
        assert_eq!(owner_of("daemon"), None);
        assert_eq!(owner_of("job-x-1-2"), None);
        let own = owner_tag().expect("tag");
        let (pid, start) = owner_of(&format!("job-{own}-1")).expect("ours");
        assert_eq!(pid, std::process::id());
        assert_eq!(start_time(pid), Some(start), "this process is alive");
        assert_ne!(start_time(pid), Some(start + 1));
    }

    #[test]
    fn the_setting_parses_and_round_trips() {
        for (text, setting) in [
            ("auto", CgroupSetting::Auto),
            ("off", CgroupSetting::Off),
            (
                "/sys/fs/cgroup/x",
                CgroupSetting::Path("/sys/fs/cgroup/x".into()),
            ),
        ] {
            assert_eq!(
                CgroupSetting::try_from(text.to_owned()),
                Ok(setting.clone())
            );
            assert_eq!(String::from(setting), text);
        }
        let err = CgroupSetting::try_from("relative/dir".to_owned()).expect_err("relative");
        assert!(err.contains("absolute path"), "{err}");
        assert!(CgroupSetting::try_from("on".to_owned()).is_err());
    }

    fn fake_cgroup(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tmp");
        for file in files {
            std::fs::write(dir.path().join(file), "").expect("file");
        }
        dir
    }

    fn read(dir: &Path, file: &str) -> String {
        std::fs::read_to_string(dir.join(file)).expect(file)
    }

    const ALL_FILES: &[&str] = &[
        "memory.max",
        "memory.swap.max",
        "memory.oom.group",
        "pids.max",
    ];

    #[test]
    fn a_job_gets_the_workers_memory_and_process_limits() {
        let limits = Limits {
            memory_mb: 64,
            max_processes: 16,
            ..Limits::default()
        };
        let all = MemoryFiles {
            swap: Ok(()),
            peak: true,
        };
        let root = CgroupRoot::fake(Path::new("/x"), Ok(all), Ok(()));
        let job = root.job_limits(&limits);
        assert_eq!(
            job,
            JobLimits {
                memory_max: Some(64 * 1024 * 1024),
                swap_off: true,
                oom_group: true,
                pids_max: Some(16),
            }
        );
        let dir = fake_cgroup(ALL_FILES);
        write_limits(dir.path(), &job).expect("written");
        assert_eq!(read(dir.path(), "memory.max"), "67108864");
        assert_eq!(read(dir.path(), "memory.swap.max"), "0");
        assert_eq!(read(dir.path(), "memory.oom.group"), "1");
        assert_eq!(read(dir.path(), "pids.max"), "16");
    }

    #[test]
    fn a_missing_controller_writes_nothing_of_it() {
        let limits = Limits::default();
        let no_swap = MemoryFiles {
            swap: Err("off".into()),
            peak: false,
        };
        let root = CgroupRoot::fake(Path::new("/x"), Ok(no_swap), Err("no pids".into()));
        let job = root.job_limits(&limits);
        assert_eq!(job.memory_max, Some(512 * 1024 * 1024));
        assert!(!job.swap_off);
        assert_eq!(job.pids_max, None);
        // Only the memory files exist: writing pids.max or memory.swap.max would fail.
        let dir = fake_cgroup(&["memory.max", "memory.oom.group"]);
        write_limits(dir.path(), &job).expect("written");
        assert_eq!(read(dir.path(), "memory.max"), "536870912");

        let root = CgroupRoot::fake(Path::new("/x"), Err("no memory".into()), Ok(()));
        let job = root.job_limits(&limits);
        assert_eq!(
            job,
            JobLimits {
                pids_max: Some(64),
                ..JobLimits::default()
            }
        );
        let dir = fake_cgroup(&["pids.max"]);
        write_limits(dir.path(), &job).expect("written");
        assert_eq!(read(dir.path(), "pids.max"), "64");
    }

    #[test]
    fn a_limit_that_cannot_be_written_is_an_error_naming_the_file() {
        let dir = fake_cgroup(&["memory.max"]);
        let job = JobLimits {
            memory_max: Some(1),
            oom_group: true,
            ..JobLimits::default()
        };
        let err = write_limits(dir.path(), &job).expect_err("memory.oom.group is missing");
        let text = err.to_string();
        assert!(
            text.contains("memory.oom.group") && text.contains("cannot write 1"),
            "{text}"
        );
    }

    #[test]
    fn an_oom_kill_is_read_from_memory_events() {
        let dir = fake_cgroup(&[]);
        assert_eq!(read_usage(dir.path()), CgroupUsage::default());
        assert!(!read_usage(dir.path()).oom_killed());
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 1\noom_kill 0\noom_group_kill 0\n",
        )
        .expect("events");
        assert!(!read_usage(dir.path()).oom_killed(), "oom alone is no kill");
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 1\noom_kill 3\noom_group_kill 1\n",
        )
        .expect("events");
        std::fs::write(dir.path().join("memory.peak"), "70254592\n").expect("peak");
        let usage = read_usage(dir.path());
        assert_eq!(
            usage,
            CgroupUsage {
                oom_kills: 3,
                oom_group_kills: 1,
                memory_peak_bytes: Some(70_254_592),
            }
        );
        assert!(usage.oom_killed());
        // A kernel without oom_group_kill (before 5.17) still reports the kill.
        std::fs::write(dir.path().join("memory.events"), "oom 1\noom_kill 1\n").expect("events");
        assert!(read_usage(dir.path()).oom_killed());
    }

    #[test]
    fn populated_follows_cgroup_events_or_procs() {
        let dir = fake_cgroup(&[]);
        std::fs::write(dir.path().join("cgroup.events"), "populated 1\nfrozen 0\n").expect("ev");
        assert!(populated(dir.path()));
        std::fs::write(dir.path().join("cgroup.events"), "populated 0\nfrozen 0\n").expect("ev");
        assert!(!populated(dir.path()));
        std::fs::remove_file(dir.path().join("cgroup.events")).expect("rm");
        std::fs::write(dir.path().join("cgroup.procs"), "123\n").expect("procs");
        assert!(populated(dir.path()));
    }

    #[test]
    fn each_feature_is_reported_on_or_off_with_its_reason() {
        let limits = Limits::default();
        let rows = enforcement(&Cgroups::Off("no v2".into()), &limits, true);
        assert_eq!(
            rows.iter().map(|r| (r.mechanism, r.on)).collect::<Vec<_>>(),
            [
                ("cgroup", false),
                ("cgroup memory", false),
                ("cgroup pids", false)
            ]
        );
        assert_eq!(rows[0].detail, "no v2");

        let root = CgroupRoot::fake(
            Path::new("/sys/fs/cgroup/unified"),
            Err("controller not available in /sys/fs/cgroup/unified (has: hugetlb)".into()),
            Ok(()),
        );
        let rows = enforcement(&Cgroups::On(Arc::new(root)), &limits, true);
        assert!(rows[0].on);
        assert!(
            rows[0]
                .detail
                .starts_with("/sys/fs/cgroup/unified/job-*: placement"),
            "{}",
            rows[0].detail
        );
        assert!(rows[0].detail.contains("cgroup.kill"), "{}", rows[0].detail);
        assert!(!rows[1].on);
        assert!(rows[1].detail.contains("(has: hugetlb)"));
        assert!(rows[2].on);
        assert!(
            rows[2].detail.starts_with("pids.max 64"),
            "{}",
            rows[2].detail
        );

        let off = enforcement(&Cgroups::Off("x".into()), &limits, false);
        assert!(off.iter().all(|r| !r.on && r.detail == "turned off"));
    }

    #[test]
    fn a_job_cgroup_that_cannot_be_set_up_is_removed_again() {
        // A plain folder stands in for the cgroup file system: `create_job` makes the job's
        // folder, which has none of the files, so writing a limit fails and the folder goes.
        let dir = tempfile::tempdir().expect("tmp");
        let root = Arc::new(CgroupRoot::fake(dir.path(), Err("none".into()), Ok(())));
        let err = root
            .create_job(&Limits::default())
            .expect_err("pids.max is missing");
        assert!(err.to_string().contains("pids.max"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
        // With no limit to write, only `cgroup.procs` is opened: missing here, also an error.
        let root = Arc::new(CgroupRoot::fake(
            dir.path(),
            Err("none".into()),
            Err("none".into()),
        ));
        let err = root.create_job(&Limits::default()).expect_err("no procs");
        assert!(err.to_string().contains("cgroup.procs"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    }
}
