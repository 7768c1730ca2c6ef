//! Starting a job's process and ending it: the OS side of the runner.
//!
//! The child gets its own process group (so a timeout kills the whole job, helpers included),
//! a clean environment, its sandbox ([`crate::sandbox`], applied last before exec) and two
//! extra pipes: the job on fd 3, the channel back on fd 4. Reaping is done by one blocking
//! thread with `wait4`, which is the only call that reports the job's CPU time and peak memory. Before it reaps, it kills what is left of the
//! process group while the group id is still reserved by the unreaped leader.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::sandbox::Prepared;

/// The job's end of the job pipe, as the runtime reads it.
pub const JOB_FD: RawFd = 3;
/// The job's end of the channel back, as the runtime writes it.
pub const CHANNEL_FD: RawFd = 4;

/// Everything needed to start one job process.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The complete environment; nothing of the daemon's own is added.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

/// The parent's ends of a started job's pipes.
#[derive(Debug)]
pub struct ChildPipes {
    pub job: OwnedFd,
    pub channel: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// How the job's process ended, with the kernel's accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub cpu_ms: u64,
    pub max_rss_kb: u64,
}

/// A running job process. Signals go to its whole group, and never after it was reaped.
#[derive(Debug, Clone)]
pub struct ChildHandle {
    pid: i32,
    /// True once the leader is reaped: from then on its group id may name someone else.
    reaped: Arc<Mutex<bool>>,
}

impl ChildHandle {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` to the job's process group, unless it is already gone.
    pub fn signal_group(&self, signal: Signal) {
        let reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            // ESRCH (nobody left in the group) is the only expected error and means done.
            let _ = killpg(Pid::from_raw(self.pid), signal);
        }
    }

    /// Waits for the leader to exit, kills whatever else is left in its group, then reaps it.
    /// Runs on a blocking thread.
    pub fn wait_blocking(&self) -> std::io::Result<ExitInfo> {
        loop {
            // SAFETY: waitid with WNOWAIT only inspects our own child; `info` is a plain C struct
            // the kernel fills.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        let mut reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        // Strays (grandchildren) must not outlive the job; the zombie leader still holds the
        // group id, so this cannot hit an unrelated group.
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        let mut status: libc::c_int = 0;
        // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: pid is our child, status and usage point to live locals.
            let rc = unsafe { libc::wait4(self.pid, &mut status, 0, &mut usage) };
            if rc == self.pid {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        *reaped = true;
        let ms = |tv: libc::timeval| (tv.tv_sec as u64) * 1000 + (tv.tv_usec as u64) / 1000;
        Ok(ExitInfo {
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            cpu_ms: ms(usage.ru_utime) + ms(usage.ru_stime),
            max_rss_kb: usage.ru_maxrss.max(0) as u64,
        })
    }
}

/// A pipe whose two ends sit at descriptors >= 10, so that moving them to 3 and 4 in the child
/// can never overwrite one with the other.
fn high_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((lift(r)?, lift(w)?))
}

fn lift(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own; the result is a new descriptor
    // that we take ownership of exactly once.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Starts the job process inside `sandbox`. The returned pipes are the parent's ends; the
/// child's ends are closed here once the child holds them.
pub fn spawn(spec: &ChildSpec, sandbox: Prepared) -> std::io::Result<(ChildHandle, ChildPipes)> {
    let (job_read, job_write) = high_pipe()?;
    let (chan_read, chan_write) = high_pipe()?;
    let job_fd = job_read.as_raw_fd();
    let chan_fd = chan_write.as_raw_fd();

    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (dup2, then the sandbox's prctl, setrlimit, setuid, landlock and seccomp calls) on
    // values computed before the fork.
    unsafe {
        command.pre_exec(move || {
            // dup2 clears close-on-exec on the new descriptor, so 3 and 4 survive exec.
            if libc::dup2(job_fd, JOB_FD) < 0 || libc::dup2(chan_fd, CHANNEL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Also sets the parent-death signal: if the daemon dies, its jobs die with it.
            sandbox.apply_in_child()
        });
    }
    let mut child = command.spawn()?;
    drop(job_read);
    drop(chan_write);
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(std::io::Error::other(
            "the child's output pipes are missing",
        ));
    };
    let handle = ChildHandle {
        pid: child.id() as i32,
        reaped: Arc::new(Mutex::new(false)),
    };
    // `child` is dropped without waiting: `wait_blocking` reaps it, to get its rusage.
    drop(child);
    Ok((
        handle,
        ChildPipes {
            job: job_write,
            channel: chan_read,
            stdout: stdout.into(),
            stderr: stderr.into(),
        },
    ))
}

/// The name of a signal number, for messages.
pub fn signal_name(signal: i32) -> String {
    Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

/// True when `path` is an executable file; used to check a venv interpreter before a start.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
