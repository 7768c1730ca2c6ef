//! The job sandbox: what a job's process may do, enforced without privileges.
//!
//! A [`SandboxPolicy`] is built from a worker's `Limits` and the paths its job needs. Its
//! [`SandboxPolicy::prepare`] does every allocation, file open and compilation in the daemon,
//! before the fork; the [`Prepared`] result's [`Prepared::apply_in_child`] then only makes
//! system calls, so it is safe between fork and exec of a multi-threaded daemon. In the child,
//! in this order: resource limits, `oom_score_adj`, the user (uid drop when the daemon is
//! root), the parent-death signal, `no_new_privs`, Landlock, seccomp. Before all of them the
//! child enters its job cgroup ([`cgroup`]), when the daemon has them.
//!
//! Nothing is skipped silently: [`SandboxPolicy::enforcement`] says for each mechanism whether
//! it is enforced here and how, and the daemon logs it at start and `workers verify` prints it.

pub mod cgroup;
pub mod landlock;
pub mod probe;
pub mod seccomp;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::resource::Resource;
use serde::{Deserialize, Serialize};

use crate::worker::{Limits, NetworkPolicy, Worker};
use cgroup::{CgroupError, CgroupSetting, Cgroups, JobCgroup};
use landlock::FsRules;
use probe::KernelSupport;

/// Largest file a job may write (`RLIMIT_FSIZE`). Its temp folder may be in memory (tmpfs).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024 * 1024;
/// Most descriptors a job may hold open (`RLIMIT_NOFILE`).
pub const MAX_OPEN_FILES: u64 = 1024;
/// The job is the OOM killer's first choice, never the daemon.
const OOM_SCORE_ADJ: &[u8] = b"1000";

/// System folders every Python needs to read: its shared libraries and loader cache.
const SYSTEM_READ: &[&str] = &[
    "/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin",
];
/// The files of `/etc` a job may read: the loader, time zones, TLS roots, name resolution, user
/// names, locale aliases, and (added at run time) the distribution's `/etc/python3*` folders,
/// which Debian's interpreter reads its `sitecustomize` from. Nothing else of `/etc` (where
/// deployments keep credentials) is readable.
const ETC_READ: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/mime.types",
    "/etc/passwd",
    "/etc/group",
    "/etc/locale.alias",
];
/// Devices and kernel files a job may read; `/proc` is left out (it would show the daemon).
const DEVICES_READ: &[&str] = &["/dev/urandom", "/dev/random", "/sys/devices/system/cpu"];
/// Devices a job may write.
const DEVICES_WRITE: &[&str] = &["/dev/null"];

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

/// The uids running jobs hold, so that no two running jobs share one while there are enough.
#[derive(Debug, Clone, Default)]
struct UidPool {
    free: Arc<Mutex<Vec<u32>>>,
}

impl UidPool {
    fn new(settings: &SandboxSettings) -> Self {
        // Reversed so that `pop` hands out the lowest uid first.
        let free = (0..settings.users)
            .rev()
            .filter_map(|i| settings.user.checked_add(i))
            .collect();
        Self {
            free: Arc::new(Mutex::new(free)),
        }
    }

    /// A uid of its own for one job, or `None` when every uid is taken.
    fn lease(&self) -> Option<UidLease> {
        let uid = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(UidLease {
            uid,
            pool: self.free.clone(),
        })
    }
}

/// A uid held by one running job; it goes back to the pool when the job's run ends.
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    pool: Arc<Mutex<Vec<u32>>>,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.uid);
    }
}

/// Which mechanisms are applied. All of them, always, in the daemon; the benchmark turns them
/// off one by one to measure what each costs. Not configurable on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mechanisms {
    pub rlimits: bool,
    pub user: bool,
    pub no_new_privs: bool,
    pub landlock: bool,
    pub seccomp: bool,
    pub cgroup: bool,
}

impl Mechanisms {
    pub const ALL: Mechanisms = Mechanisms {
        rlimits: true,
        user: true,
        no_new_privs: true,
        landlock: true,
        seccomp: true,
        cgroup: true,
    };
    pub const NONE: Mechanisms = Mechanisms {
        rlimits: false,
        user: false,
        no_new_privs: false,
        landlock: false,
        seccomp: false,
        cgroup: false,
    };
}

/// The sandbox of a runner: its settings and mechanisms, and the kernel it runs on.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub settings: SandboxSettings,
    pub mechanisms: Mechanisms,
    pub support: KernelSupport,
    /// The folder of job cgroups, set up once per process, or why there are none.
    pub cgroups: Cgroups,
    /// Shared by the runner's clones, so that concurrent jobs never hold the same uid.
    uids: UidPool,
}

impl Sandbox {
    /// The full sandbox on this kernel, with job cgroups set up as `settings.cgroup` says.
    /// Fails only when `sandbox.cgroup` names a folder that cannot be used.
    pub fn new(settings: SandboxSettings) -> Result<Self, CgroupError> {
        let support = KernelSupport::get().clone();
        let job_user = support.is_root.then_some((settings.user, settings.group));
        let cgroups = Cgroups::setup(&settings.cgroup, job_user)?;
        Ok(Self {
            uids: UidPool::new(&settings),
            settings,
            mechanisms: Mechanisms::ALL,
            support,
            cgroups,
        })
    }

    /// A new cgroup for one job of a worker with `limits`; `None` when job cgroups are off.
    pub fn job_cgroup(&self, limits: &Limits) -> Result<Option<JobCgroup>, CgroupError> {
        match (&self.cgroups, self.mechanisms.cgroup) {
            (Cgroups::On(root), true) => root.create_job(limits).map(Some),
            _ => Ok(None),
        }
    }

    /// The policy of one job: [`Sandbox::policy`] with a uid of the job's own from the pool
    /// when the job runs as a dropped user; the lease must live until the job has ended.
    pub fn policy_for_job(
        &self,
        worker: &Worker,
        python: &Path,
        runtime_dir: &Path,
        temp_base: &Path,
    ) -> (SandboxPolicy, Option<UidLease>) {
        let mut policy = self.policy(worker, python, runtime_dir, temp_base);
        let mut lease = None;
        if let JobUser::Drop { uid, .. } = &mut policy.user
            && let Some(l) = self.uids.lease()
        {
            *uid = l.uid;
            lease = Some(l);
        }
        (policy, lease)
    }

    /// Only the given mechanisms: for the benchmark.
    pub fn with_mechanisms(mut self, mechanisms: Mechanisms) -> Self {
        self.mechanisms = mechanisms;
        self
    }

    /// The policy of one worker's jobs.
    pub fn policy(
        &self,
        worker: &Worker,
        python: &Path,
        runtime_dir: &Path,
        temp_base: &Path,
    ) -> SandboxPolicy {
        let venv = python
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut read_only: Vec<PathBuf> =
            vec![venv.clone(), worker.dir.clone(), runtime_dir.to_path_buf()];
        read_only.extend(interpreter_prefixes(python, &venv));
        read_only.extend(SYSTEM_READ.iter().map(PathBuf::from));
        read_only.extend(ETC_READ.iter().map(PathBuf::from));
        read_only.extend(
            std::fs::read_dir("/etc")
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
                .map(|e| e.path()),
        );
        read_only.extend(DEVICES_READ.iter().map(PathBuf::from));
        let mut read_write: Vec<PathBuf> = worker.limits().writable.clone();
        read_write.extend(DEVICES_WRITE.iter().map(PathBuf::from));

        let user = if !self.support.is_root {
            JobUser::Same {
                uid: nix::unistd::getuid().as_raw(),
            }
        } else {
            let (uid, gid) = (self.settings.user, self.settings.group);
            // Everything the job opens by path must be reachable by its user.
            let mut needed = vec![python.to_path_buf(), temp_base.to_path_buf()];
            needed.extend(read_only[..3].iter().cloned());
            needed.extend(interpreter_prefixes(python, &venv));
            // A folder not made yet (the runtime, before the first `exec`) is made readable.
            match needed
                .iter()
                .filter(|p| p.exists())
                .find_map(|p| unreachable_part(p, uid, gid))
            {
                None => JobUser::Drop { uid, gid },
                Some(blocked) => JobUser::RootWithoutCapabilities { uid, blocked },
            }
        };
        SandboxPolicy {
            users: self.settings.users,
            limits: worker.limits().clone(),
            fs: FsRules {
                read_only,
                read_write,
            },
            user,
            mechanisms: self.mechanisms,
            support: self.support.clone(),
            cgroups: self.cgroups.clone(),
        }
    }
}

/// Whom the job runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobUser {
    /// The daemon is not root: the job keeps the daemon's uid (the container's user).
    Same { uid: u32 },
    /// The daemon is root: the job runs as this unprivileged user.
    Drop { uid: u32, gid: u32 },
    /// The daemon is root but `uid` cannot reach `blocked`, which the job needs: the job stays
    /// uid 0 with every capability dropped. Reported at start; weaker (see `enforcement`).
    RootWithoutCapabilities { uid: u32, blocked: PathBuf },
}

/// One mechanism's state on this daemon, for start-up logs and `workers verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enforced {
    pub mechanism: &'static str,
    /// False when the mechanism is not enforced here; `detail` then says why.
    pub on: bool,
    pub detail: String,
}

/// What the sandbox does to one worker's jobs.
#[derive(Debug, Clone)]
pub struct SandboxPolicy {
    /// How many uids jobs take turns with (`sandbox.users`).
    pub users: u32,
    pub limits: Limits,
    pub fs: FsRules,
    pub user: JobUser,
    pub mechanisms: Mechanisms,
    pub support: KernelSupport,
    pub cgroups: Cgroups,
}

/// Preparing a job's sandbox failed; the job does not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Landlock(#[from] landlock::LandlockError),
    #[error("cannot hand the job's temp folder {path} to uid {uid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        source: std::io::Error,
    },
}

impl SandboxPolicy {
    /// Why a job of this policy would keep uid 0 (a root daemon whose job user cannot reach
    /// what the job needs); the runner then refuses to start it. `None` otherwise.
    pub fn would_stay_root(&self) -> Option<String> {
        match &self.user {
            JobUser::RootWithoutCapabilities { uid, blocked } if self.mechanisms.user => {
                Some(format!(
                    "the job would run as root: uid {uid} cannot reach {}",
                    blocked.display()
                ))
            }
            _ => None,
        }
    }

    /// True when the job runs as a dedicated user, so `RLIMIT_NPROC` counts only jobs.
    fn dedicated_user(&self) -> bool {
        self.mechanisms.user && matches!(self.user, JobUser::Drop { .. })
    }

    /// Each mechanism, and whether and how it is enforced for this worker on this kernel.
    pub fn enforcement(&self) -> Vec<Enforced> {
        let on = |mechanism, detail: String| Enforced {
            mechanism,
            on: true,
            detail,
        };
        let off = |mechanism, detail: String| Enforced {
            mechanism,
            on: false,
            detail,
        };
        let l = &self.limits;
        let m = &self.mechanisms;
        let mut out = Vec::new();
        out.push(if m.user {
            match &self.user {
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
        });
        out.push(if m.rlimits {
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
        });
        out.push(if m.rlimits && self.dedicated_user() {
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
            let pids_max = matches!(&self.cgroups, Cgroups::On(root) if root.pids.is_ok())
                && m.cgroup;
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
        });
        out.push(on(
            "oom_score_adj",
            "1000: the OOM killer picks the job, never the daemon".into(),
        ));
        out.push(if !m.no_new_privs {
            off("no_new_privs", "turned off".into())
        } else {
            on("no_new_privs", "on".into())
        });
        out.push(match (m.seccomp, self.support.seccomp) {
            (false, _) => off("seccomp", "turned off".into()),
            (true, false) => off("seccomp", "the kernel has no seccomp".into()),
            (true, true) => on(
                "seccomp",
                format!(
                    "EPERM for {} calls (ptrace, mount, bpf, unshare, keyctl, setsid, io_uring…); sockets: {}",
                    seccomp::denied_names().count(),
                    match l.network {
                        NetworkPolicy::Deny => "AF_UNIX only",
                        NetworkPolicy::Allow => "all but AF_PACKET",
                    }
                ),
            ),
        });
        out.push(match (m.landlock, &self.support.landlock_abi) {
            (false, _) => off("landlock", "turned off".into()),
            (true, Err(why)) => off(
                "landlock",
                format!("{why}: the job can read and write whatever its uid can"),
            ),
            (true, Ok(abi)) => on("landlock", landlock::features(*abi)),
        });
        out.extend(cgroup::enforcement(&self.cgroups, l, m.cgroup));
        out
    }

    /// Does, before the fork, everything that allocates or opens files: the rlimit values,
    /// the seccomp programs, the Landlock ruleset (with `workdir` writable), and hands `workdir`
    /// to the job's user.
    pub fn prepare(&self, workdir: &Path) -> Result<Prepared, SandboxError> {
        self.prepare_as(workdir, seccomp::FilterKind::Job)
    }

    /// [`SandboxPolicy::prepare`] for the warm parent of fork mode (`dir` is its private
    /// folder, under which its jobs' temp folders are made): every mechanism a job gets, with
    /// one difference, its seccomp filter allows `setpgid` so that each forked child can lead
    /// its own process group before it installs the job's filter ([`Self::fork_child_filters`]).
    pub fn prepare_warm_parent(&self, dir: &Path) -> Result<Prepared, SandboxError> {
        self.prepare_as(dir, seccomp::FilterKind::WarmParent)
    }

    /// The job's seccomp filters for the children of the warm parent `parent_pid`, as bytes
    /// the child installs itself (`seccomp::to_bytes`); empty when seccomp is off here. They
    /// protect the daemon and the warm parent from the job's signals.
    pub fn fork_child_filters(&self, parent_pid: u32) -> Result<Vec<u8>, SandboxError> {
        if !(self.mechanisms.seccomp && self.support.seccomp) {
            return Ok(Vec::new());
        }
        // The parent's own filter (the job's, with `setpgid` allowed and the daemon protected)
        // is inherited; the child adds the difference.
        let filters = seccomp::compile_for(
            self.limits.network,
            &[parent_pid],
            seccomp::FilterKind::ForkChild,
        )?;
        Ok(seccomp::to_bytes(&filters))
    }

    /// A forked child's own Landlock layer: the job's full ruleset with only its `workdir`
    /// writable, stacked on the warm parent's (whose writable folder holds every job's temp
    /// folder), so that a job cannot touch its neighbours' folders and, with ABI 6, cannot
    /// signal its warm parent. Also hands `workdir` to the job's user (the parent's uid).
    /// `None` when Landlock is off here.
    pub fn prepare_fork_child(&self, workdir: &Path) -> Result<Option<OwnedFd>, SandboxError> {
        if let (JobUser::Drop { uid, gid }, true) = (&self.user, self.mechanisms.user) {
            nix::unistd::chown(
                workdir,
                Some(nix::unistd::Uid::from_raw(*uid)),
                Some(nix::unistd::Gid::from_raw(*gid)),
            )
            .map_err(|e| SandboxError::Chown {
                path: workdir.to_path_buf(),
                uid: *uid,
                source: e.into(),
            })?;
        }
        match (self.mechanisms.landlock, &self.support.landlock_abi) {
            (true, Ok(_)) => {
                let mut rules = self.fs.clone();
                rules.read_write.push(workdir.to_path_buf());
                Ok(landlock::build(&rules, self.limits.network)?)
            }
            _ => Ok(None),
        }
    }

    fn prepare_as(
        &self,
        workdir: &Path,
        filter: seccomp::FilterKind,
    ) -> Result<Prepared, SandboxError> {
        let m = &self.mechanisms;
        let l = &self.limits;
        let mut rlimits = Vec::new();
        if m.rlimits {
            let memory = l.memory_mb * 1024 * 1024;
            rlimits.extend([
                (Resource::RLIMIT_AS, memory, memory),
                // SIGXCPU at the soft limit, SIGKILL one second later.
                (Resource::RLIMIT_CPU, l.cpu_s, l.cpu_s + 1),
                (Resource::RLIMIT_CORE, 0, 0),
                (Resource::RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
            ]);
            // Never above what the daemon has: raising a hard limit needs a privilege.
            let (_, hard_files) =
                nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0));
            let files = MAX_OPEN_FILES.min(hard_files.max(64));
            rlimits.push((Resource::RLIMIT_NOFILE, files, files));
            if self.dedicated_user() {
                rlimits.push((Resource::RLIMIT_NPROC, l.max_processes, l.max_processes));
            }
        }
        let user = match (&self.user, m.user) {
            (JobUser::Drop { uid, gid }, true) => {
                nix::unistd::chown(
                    workdir,
                    Some(nix::unistd::Uid::from_raw(*uid)),
                    Some(nix::unistd::Gid::from_raw(*gid)),
                )
                .map_err(|e| SandboxError::Chown {
                    path: workdir.to_path_buf(),
                    uid: *uid,
                    source: e.into(),
                })?;
                ChildUser::Drop {
                    uid: *uid,
                    gid: *gid,
                }
            }
            (JobUser::RootWithoutCapabilities { .. }, true) => ChildUser::DropCapabilities {
                last_cap: last_capability(),
            },
            _ => ChildUser::Keep,
        };
        let landlock = match (m.landlock, &self.support.landlock_abi) {
            (true, Ok(_)) => {
                let mut rules = self.fs.clone();
                rules.read_write.push(workdir.to_path_buf());
                landlock::build(&rules, l.network)?
            }
            _ => None,
        };
        let seccomp = if m.seccomp && self.support.seccomp {
            seccomp::compile_for(l.network, &[std::process::id()], filter)?
        } else {
            Vec::new()
        };
        Ok(Prepared {
            rlimits,
            user,
            no_new_privs: m.no_new_privs || landlock.is_some() || !seccomp.is_empty(),
            landlock,
            seccomp,
            daemon_pid: nix::unistd::getpid().as_raw(),
            cgroup: None,
        })
    }
}

/// The interpreter's installation folders: where `python` really lives (its prefix, one level
/// above `bin/`) and the `home` its venv's `pyvenv.cfg` names.
fn interpreter_prefixes(python: &Path, venv: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(real) = std::fs::canonicalize(python)
        && let Some(prefix) = real.parent().and_then(Path::parent)
    {
        found.push(prefix.to_path_buf());
    }
    if let Ok(cfg) = std::fs::read_to_string(venv.join("pyvenv.cfg")) {
        for line in cfg.lines() {
            if let Some((key, value)) = line.split_once('=')
                && key.trim() == "home"
                && let Ok(home) = std::fs::canonicalize(value.trim())
                && let Some(prefix) = home.parent()
            {
                found.push(prefix.to_path_buf());
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The first part of `path` (after resolving links) that `uid`/`gid` (with no supplementary
/// groups) cannot search, or read at the end; `None` when it can.
pub fn unreachable_part(path: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let allowed = |meta: &std::fs::Metadata, bit: u32| {
        let mode = meta.mode();
        let shift = if meta.uid() == uid {
            6
        } else if meta.gid() == gid {
            3
        } else {
            0
        };
        mode & (bit << shift) != 0
    };
    let ancestors: Vec<&Path> = real.ancestors().collect();
    for dir in ancestors.iter().rev() {
        let Ok(meta) = std::fs::metadata(dir) else {
            return Some(dir.to_path_buf());
        };
        let last = *dir == real.as_path();
        let ok = if last {
            allowed(&meta, 0o4) && (!meta.is_dir() || allowed(&meta, 0o1))
        } else {
            allowed(&meta, 0o1)
        };
        if !ok {
            return Some(dir.to_path_buf());
        }
    }
    None
}

fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// What the child does about its user.
#[derive(Debug)]
enum ChildUser {
    Keep,
    Drop {
        uid: u32,
        gid: u32,
    },
    /// Stay uid 0 but drop the capability bounding set and every capability.
    DropCapabilities {
        last_cap: u32,
    },
}

/// A job's sandbox, ready to apply between fork and exec.
#[derive(Debug)]
pub struct Prepared {
    rlimits: Vec<(Resource, u64, u64)>,
    user: ChildUser,
    no_new_privs: bool,
    landlock: Option<OwnedFd>,
    seccomp: Vec<seccompiler::BpfProgram>,
    /// The daemon, which the child checks is still its parent after the uid change.
    daemon_pid: i32,
    /// The job cgroup's `cgroup.procs`, which the child enters first of all.
    cgroup: Option<OwnedFd>,
}

impl Prepared {
    /// Makes the child enter the job cgroup whose `cgroup.procs` is `procs` (a descriptor the
    /// daemon opened) before anything else, so that nothing it starts is outside it.
    pub fn enter_cgroup(&mut self, procs: BorrowedFd<'_>) -> std::io::Result<()> {
        // A copy at 10 or above: the child moves its pipes to 0-4 before this is written to,
        // and must not overwrite it.
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor the caller holds into a new one that
        // is owned here alone.
        let raw = unsafe { libc::fcntl(procs.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        self.cgroup = Some(unsafe { OwnedFd::from_raw_fd(raw) });
        Ok(())
    }

    /// Applies the sandbox to the calling (child) process. Only system calls on values made
    /// before the fork: no allocation, no lock, so it is safe in `pre_exec`.
    pub fn apply_in_child(&self) -> std::io::Result<()> {
        let os_err = std::io::Error::last_os_error;
        // First: the job cgroup, still with the daemon's credentials, before the child (or the
        // program it becomes) can start anything.
        if let Some(procs) = &self.cgroup {
            cgroup::enter(procs.as_fd())?;
        }
        // The daemon is not dumpable (so same-uid jobs cannot read its /proc files), and a
        // forked child inherits that until exec: its own /proc/self files then belong to root
        // and a non-root daemon's child could not write its oom_score_adj. The child becomes
        // dumpable again here, as exec would make it anyway; the daemon stays as it is.
        // SAFETY: prctl with integer arguments, on this process only.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) } < 0 {
            return Err(os_err());
        }
        for (resource, soft, hard) in &self.rlimits {
            nix::sys::resource::setrlimit(*resource, *soft, *hard)?;
        }
        write_oom_score_adj()?;
        match self.user {
            ChildUser::Keep => {}
            ChildUser::Drop { uid, gid } => {
                // SAFETY: plain system calls with integer arguments; a null list with length
                // 0 clears the supplementary groups. Raw calls, not glibc's wrappers: these
                // would signal every thread glibc believes the process has (its set-id
                // broadcast), which is wrong in a child started by a raw `clone3`, whose only
                // thread is this one (`runner::child`).
                unsafe {
                    if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) < 0
                        || libc::syscall(libc::SYS_setresgid, gid, gid, gid) < 0
                        || libc::syscall(libc::SYS_setresuid, uid, uid, uid) < 0
                    {
                        return Err(os_err());
                    }
                }
            }
            ChildUser::DropCapabilities { last_cap } => drop_capabilities(last_cap)?,
        }
        // A uid change clears the parent-death signal, so it is set after it; if the daemon
        // died before this point, the job must not start at all.
        // SAFETY: prctl and getppid take and return integers only.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                return Err(os_err());
            }
            if libc::getppid() != self.daemon_pid {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        if self.no_new_privs {
            // SAFETY: integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
                return Err(os_err());
            }
        }
        if let Some(ruleset) = &self.landlock {
            landlock::restrict_self(ruleset)?;
        }
        // Last: the filter denies calls the steps above make.
        seccomp::install(&self.seccomp)
    }
}

/// `echo 1000 > /proc/self/oom_score_adj` with raw calls. Raising the score needs no privilege.
fn write_oom_score_adj() -> std::io::Result<()> {
    const PATH: &[u8] = b"/proc/self/oom_score_adj\0";
    // SAFETY: PATH is NUL-terminated; the descriptor is closed before returning.
    unsafe {
        let fd = libc::open(PATH.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, OOM_SCORE_ADJ.as_ptr().cast(), OOM_SCORE_ADJ.len());
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if written < 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Drops every capability of a uid-0 child for good: the bounding set (so `exec` cannot give
/// them back), the ambient set, then the effective, permitted and inheritable sets.
fn drop_capabilities(last_cap: u32) -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: integer prctls; capset reads a header and two data structs that live on the
    // stack for the duration of the call.
    unsafe {
        for cap in 0..=last_cap {
            // EINVAL for a capability this kernel does not know is harmless.
            libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ) < 0
            || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) < 0
            || libc::syscall(libc::SYS_capset, &header, data.as_ptr()) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes the daemon's own `/proc/<pid>` files (environ, mem, maps) readable only with
/// CAP_SYS_PTRACE, even by processes of the same uid: a job running as the daemon's user
/// (a non-root container) on a kernel without Landlock cannot read its secrets there.
pub fn harden_daemon() {
    // SAFETY: integer arguments only; affects this process's dumpable flag.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc < 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "Could not make the daemon non-dumpable; same-uid jobs may read its /proc files where Landlock is missing."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn reachability_follows_every_folder_on_the_way() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("inner");
        std::fs::create_dir(&dir).expect("mkdir");
        let file = dir.join("f");
        std::fs::write(&file, "x").expect("write");
        chmod(root.path(), 0o755);
        chmod(&dir, 0o755);
        chmod(&file, 0o644);
        let me = nix::unistd::getuid().as_raw();
        // Another uid and gid than the owner's: only the "other" bits count.
        let (uid, gid) = (me.wrapping_add(12345), 54321);
        assert_eq!(unreachable_part(&file, uid, gid), None);
        chmod(&dir, 0o700);
        assert_eq!(unreachable_part(&file, uid, gid), Some(dir.clone()));
        // The owner reaches it through the owner bits.
        assert_eq!(unreachable_part(&file, me, gid), None);
        chmod(&dir, 0o755);
        chmod(&file, 0o600);
        assert_eq!(unreachable_part(&file, uid, gid), Some(file.clone()));
    }

    #[test]
    fn the_filters_compile_for_both_network_policies() {
        for network in [NetworkPolicy::Deny, NetworkPolicy::Allow] {
            let filters = seccomp::compile(network, 4242).expect("compiles");
            assert_eq!(filters.len(), 2);
            assert!(filters.iter().all(|f| !f.is_empty()));
        }
    }

    #[test]
    fn a_forked_child_adds_a_small_filter_to_its_parents() {
        let job = seccomp::compile(NetworkPolicy::Deny, 4242).expect("compiles");
        let delta =
            seccomp::compile_for(NetworkPolicy::Deny, &[4243], seccomp::FilterKind::ForkChild)
                .expect("compiles");
        assert_eq!(delta.len(), 1, "the parent's clone3 filter is inherited");
        assert!(
            delta[0].len() * 5 < job[0].len(),
            "{} instructions against the job's {}",
            delta[0].len(),
            job[0].len()
        );
    }

    #[test]
    fn every_mechanism_is_reported() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("w");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("worker.toml"), "entrypoint = \"m:f\"\n").expect("toml");
        std::fs::write(dir.join("requirements.txt"), "").expect("reqs");
        let worker = Worker::load(&dir).expect("worker");
        let dir = root.path();
        let sandbox = Sandbox::new(SandboxSettings::default()).expect("auto never fails");
        let python = dir.join("venv/bin/python");
        let policy = sandbox.policy(&worker, &python, dir, dir);
        let names: Vec<&str> = policy.enforcement().iter().map(|e| e.mechanism).collect();
        assert_eq!(
            names,
            [
                "user",
                "rlimits",
                "processes",
                "oom_score_adj",
                "no_new_privs",
                "seccomp",
                "landlock",
                "cgroup",
                "cgroup memory",
                "cgroup pids"
            ]
        );
        let off = sandbox
            .with_mechanisms(Mechanisms::NONE)
            .policy(&worker, &python, dir, dir)
            .enforcement();
        for e in off.iter().filter(|e| e.mechanism != "oom_score_adj") {
            assert!(!e.on, "{} still reported on: {}", e.mechanism, e.detail);
        }
    }
}
