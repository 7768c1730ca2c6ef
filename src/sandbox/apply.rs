//! The sandbox applied in the child, between fork and exec: only system calls on values the
//! daemon prepared before the fork ([`super::SandboxPolicy::prepare`]), safe in the child of a
//! multi-threaded process. Also the daemon's own hardening ([`harden_daemon`]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sys::resource::Resource;

use super::{OOM_SCORE_ADJ, cgroup, landlock, seccomp};

pub(super) fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// What the child does about its user.
#[derive(Debug)]
pub(super) enum ChildUser {
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
    pub(super) rlimits: Vec<(Resource, u64, u64)>,
    pub(super) user: ChildUser,
    pub(super) no_new_privs: bool,
    pub(super) landlock: Option<OwnedFd>,
    pub(super) seccomp: Vec<seccompiler::BpfProgram>,
    /// The daemon, which the child checks is still its parent after the uid change.
    pub(super) daemon_pid: i32,
    /// The job cgroup's `cgroup.procs`, which the child enters first of all.
    pub(super) cgroup: Option<OwnedFd>,
    /// The network namespace of its worker's egress proxy, entered before the uid drop
    /// (`setns` needs the daemon's `CAP_SYS_ADMIN`).
    pub(super) netns: Option<OwnedFd>,
}

/// The first descriptor number a child's own descriptors never reach: it puts stdin, stdout,
/// stderr, the job and the channel on 0 to 4.
const ABOVE_JOB_DESCRIPTORS: libc::c_int = 10;

/// A close-on-exec copy of `fd` at 10 or above, so that a child moving its pipes onto 0 to 4
/// can never overwrite it (the only copy of this logic: pipes, the Landlock ruleset, a job
/// cgroup's `cgroup.procs` and a warm parent's control socket all use it).
pub fn above_job_descriptors(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor the caller holds into a new one.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, ABOVE_JOB_DESCRIPTORS) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl Prepared {
    /// Makes the child enter the job cgroup whose `cgroup.procs` is `procs` (a descriptor the
    /// daemon opened) before anything else, so that nothing it starts is outside it.
    pub fn enter_cgroup(&mut self, procs: BorrowedFd<'_>) -> std::io::Result<()> {
        // A copy at 10 or above: the child moves its pipes to 0-4 before this is written to,
        // and must not overwrite it.
        self.cgroup = Some(above_job_descriptors(procs)?);
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
        if let Some(netns) = &self.netns {
            crate::egress::netns::enter(netns)?;
        }
        // The daemon is not dumpable (so same-uid jobs cannot read its /proc files), and a
        // forked child inherits that until exec: its own /proc/self files then belong to root
        // and a non-root daemon's child could not write its oom_score_adj. The child becomes
        // dumpable again here, as exec would make it anyway; the daemon stays as it is.
        // SAFETY: prctl with integer arguments, on this process only.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) } < 0 {
            return Err(os_err());
        }
        // Before the limits: this opens a descriptor, numbered above every one the daemon
        // holds, which may be past the job's RLIMIT_NOFILE (EMFILE) once that is set.
        write_oom_score_adj()?;
        for (resource, soft, hard) in &self.rlimits {
            nix::sys::resource::setrlimit(*resource, *soft, *hard)?;
        }
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
