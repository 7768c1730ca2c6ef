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

mod apply;
pub mod cgroup;
pub mod landlock;
pub mod probe;
mod report;
pub mod seccomp;
mod settings;
mod users;

use apply::{ChildUser, last_capability};
pub use apply::{Prepared, above_job_descriptors, harden_daemon};
pub use report::Enforced;
pub use settings::{MECHANISMS, SandboxSettings, is_required, unmet};
use users::UidPool;
pub use users::{JobUser, UidLease, unreachable_part};

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::resource::Resource;

use crate::egress::EgressSandbox;
use crate::worker::{Limits, NetworkPolicy, Worker};
use cgroup::{CgroupError, Cgroups, JobCgroup};
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
    /// A network namespace holding only loopback for workers with an egress list.
    pub netns: bool,
}

impl Mechanisms {
    pub const ALL: Mechanisms = Mechanisms {
        rlimits: true,
        user: true,
        no_new_privs: true,
        landlock: true,
        seccomp: true,
        cgroup: true,
        netns: true,
    };
    pub const NONE: Mechanisms = Mechanisms {
        rlimits: false,
        user: false,
        no_new_privs: false,
        landlock: false,
        seccomp: false,
        cgroup: false,
        netns: false,
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
            egress: None,
        }
    }
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
    /// For a worker with an egress list: its proxy's port and namespace (set by the runner;
    /// `None` in reports made before the proxy runs).
    pub egress: Option<EgressSandbox>,
}

/// What the kernel lets a job's sockets do, from the worker's `network` and its proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetAccess {
    /// Only local (AF_UNIX) sockets.
    Deny,
    /// Everything but raw packet sockets.
    Allow,
    /// Local sockets and TCP over IPv4, connecting only to `port` (the egress proxy's; 0 when
    /// it is not known yet). In a network namespace of its own the job reaches nothing else
    /// anyway; without one, this is what narrows it (`docs/egress.md`).
    Proxy { port: u16 },
}

/// Preparing a job's sandbox failed; the job does not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Landlock(#[from] landlock::LandlockError),
    #[error("cannot hand the job its network namespace: {0}")]
    Netns(std::io::Error),
    #[error("cannot hand the job's temp folder {path} to uid {uid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        source: std::io::Error,
    },
}

impl SandboxPolicy {
    /// What the kernel lets the job's sockets do.
    pub fn net_access(&self) -> NetAccess {
        match &self.limits.network {
            NetworkPolicy::Deny => NetAccess::Deny,
            NetworkPolicy::Allow => NetAccess::Allow,
            NetworkPolicy::List(_) => NetAccess::Proxy {
                port: self.egress.as_ref().map_or(0, |e| e.port),
            },
        }
    }

    /// The namespace the job enters, when its worker has an egress list and the daemon made
    /// one (a copy numbered above the job's descriptors, closed at exec).
    fn netns(&self) -> Result<Option<OwnedFd>, SandboxError> {
        match self.egress.as_ref().and_then(|e| e.netns.as_ref()) {
            Some(fd) if self.mechanisms.netns => above_job_descriptors(fd.as_fd())
                .map(Some)
                .map_err(SandboxError::Netns),
            _ => Ok(None),
        }
    }

    /// Why a job of this policy would keep uid 0 (a root daemon whose job user cannot reach
    /// what the job needs); the runner then refuses to start it. `None` otherwise.
    pub fn would_stay_root(&self) -> Option<String> {
        let missing = &self.support.missing_root_capabilities;
        match &self.user {
            JobUser::Drop { .. } if self.mechanisms.user && !missing.is_empty() => Some(format!(
                "the daemon is uid 0 without {}: it can neither start the job as another uid nor stop it",
                missing.join(", ")
            )),
            JobUser::RootWithoutCapabilities { uid, blocked } if self.mechanisms.user => {
                Some(format!(
                    "the job would run as root: uid {uid} cannot reach {}",
                    blocked.display()
                ))
            }
            _ => None,
        }
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
            self.net_access(),
            &[parent_pid],
            seccomp::FilterKind::ForkChild,
        )?;
        Ok(seccomp::to_bytes(&filters))
    }

    /// A forked child's own Landlock layer: the job's full ruleset with only its `workdir`
    /// writable, stacked on the warm parent's (whose writable folder holds every job's temp
    /// folder), so that a job cannot touch its neighbours' folders and, with ABI 6, cannot
    /// signal its warm parent. Also hands `workdir` to the job's user (the parent's uid).
    /// `None` when Landlock is off here. `opened` is [`Self::fork_child_rules`], made once per
    /// warm parent: the ruleset is the same as if every path were opened now.
    pub fn prepare_fork_child(
        &self,
        workdir: &Path,
        opened: Option<&landlock::OpenedRules>,
    ) -> Result<Option<OwnedFd>, SandboxError> {
        if let (JobUser::Drop { uid, gid }, true) = (&self.user, self.mechanisms.user) {
            hand_to(workdir, *uid, *gid)?;
        }
        match (opened, &self.support.landlock_abi) {
            (Some(opened), Ok(_)) if self.mechanisms.landlock => Ok(landlock::build_from(
                opened,
                &[workdir.to_path_buf()],
                self.net_access(),
            )?),
            _ => Ok(None),
        }
    }

    /// The paths of the forked children's Landlock ruleset (all but each job's temp folder),
    /// opened once for [`Self::prepare_fork_child`]; `None` when Landlock is off here.
    pub fn fork_child_rules(&self) -> Option<landlock::OpenedRules> {
        match (self.mechanisms.landlock, &self.support.landlock_abi) {
            (true, Ok(_)) => Some(landlock::OpenedRules::open(&self.fs)),
            _ => None,
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
                hand_to(workdir, *uid, *gid)?;
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
                landlock::build(&rules, self.net_access())?
            }
            _ => None,
        };
        let seccomp = if m.seccomp && self.support.seccomp {
            seccomp::compile_for(self.net_access(), &[std::process::id()], filter)?
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
            netns: self.netns()?,
        })
    }
}

/// Gives the job's folder to the job's user, so that the job may write it and nothing else.
fn hand_to(workdir: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    nix::unistd::chown(
        workdir,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| SandboxError::Chown {
        path: workdir.to_path_buf(),
        uid,
        source: e.into(),
    })
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
        for network in [
            NetAccess::Deny,
            NetAccess::Allow,
            NetAccess::Proxy { port: 3128 },
        ] {
            let filters = seccomp::compile(network, 4242).expect("compiles");
            assert_eq!(filters.len(), 2);
            assert!(filters.iter().all(|f| !f.is_empty()));
        }
    }

    #[test]
    fn a_forked_child_adds_a_small_filter_to_its_parents() {
        let job = seccomp::compile(NetAccess::Deny, 4242).expect("compiles");
        let delta = seccomp::compile_for(NetAccess::Deny, &[4243], seccomp::FilterKind::ForkChild)
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
    fn the_netns_line_shows_the_egress_list_and_the_fallback() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("w");
        std::fs::create_dir(&dir).expect("mkdir");
        let toml = "entrypoint = \"m:f\"\nnetwork = [\"*.blob.core.windows.net:443\"]\n";
        std::fs::write(dir.join("worker.toml"), toml).expect("toml");
        std::fs::write(dir.join("requirements.txt"), "").expect("reqs");
        let worker = Worker::load(&dir).expect("worker");
        let dir = root.path();
        let python = dir.join("venv/bin/python");
        let required = ["netns".to_owned()];
        let line = |mechanisms| {
            let sandbox = Sandbox::new(SandboxSettings::default())
                .expect("auto never fails")
                .with_mechanisms(mechanisms);
            let policy = sandbox.policy(&worker, &python, dir, dir);
            assert_eq!(policy.net_access(), NetAccess::Proxy { port: 0 });
            let enforcement = policy.enforcement();
            let line = enforcement
                .iter()
                .find(|e| e.mechanism == "netns")
                .expect("a netns line")
                .clone();
            // sandbox.require = ["netns"] refuses exactly when the line is off.
            assert_eq!(unmet(&required, &enforcement).is_empty(), line.on);
            line
        };
        let full = line(Mechanisms::ALL);
        assert!(
            full.detail
                .ends_with("allowed: *.blob.core.windows.net:443"),
            "{}",
            full.detail
        );
        assert_eq!(full.on, crate::egress::netns::support().is_ok());
        let without = line(Mechanisms {
            netns: false,
            ..Mechanisms::ALL
        });
        assert!(!without.on);
        assert!(
            without.detail.contains("instead") && without.detail.contains("*.blob"),
            "{}",
            without.detail
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
        // Every mechanism is reported, in the order and under the names sandbox.require takes.
        let names: Vec<String> = policy
            .enforcement()
            .iter()
            .map(|e| e.mechanism.replace(' ', "_"))
            .collect();
        assert_eq!(names, MECHANISMS);
        let off = sandbox
            .with_mechanisms(Mechanisms::NONE)
            .policy(&worker, &python, dir, dir)
            .enforcement();
        for e in off.iter().filter(|e| e.mechanism != "oom_score_adj") {
            assert!(!e.on, "{} still reported on: {}", e.mechanism, e.detail);
        }
    }
}
