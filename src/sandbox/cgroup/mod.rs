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

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Enforced;
use crate::worker::Limits;

mod delegate;
mod discover;
mod job;
mod report;

pub use delegate::owner_tag;
pub use discover::own_cgroup;
use discover::*;
use job::*;
pub use job::{JobCgroup, enter, read_usage, write_limits};
pub use report::enforcement;

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

/// Whether a part of job cgroups works on this host: on, with what it found, or off, and why
/// (said by `workers verify` and at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support<T = ()> {
    On(T),
    Off(String),
}

impl<T> Support<T> {
    pub fn is_on(&self) -> bool {
        matches!(self, Support::On(_))
    }

    /// What it found, when it is on.
    pub fn on(&self) -> Option<&T> {
        match self {
            Support::On(found) => Some(found),
            Support::Off(_) => None,
        }
    }
}

impl<T> From<Result<T, String>> for Support<T> {
    fn from(probed: Result<T, String>) -> Self {
        match probed {
            Ok(found) => Support::On(found),
            Err(why) => Support::Off(why),
        }
    }
}

/// The memory controller's files in job cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryFiles {
    /// `memory.swap.max`, or why there is none (swap accounting off).
    pub swap: Support,
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
    pub memory: Support<MemoryFiles>,
    /// `pids.max` per job, or why not.
    pub pids: Support,
    pub kill: KillMethod,
    /// This daemon's part of the job cgroups' names ([`owner_tag`]).
    owner: String,
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
                memory = root.memory.is_on(),
                pids = root.pids.is_on(),
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

#[cfg(test)]
mod tests {
    use super::delegate::{owner_of, start_time};
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
            swap: Support::On(()),
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
            swap: Support::Off("off".into()),
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
