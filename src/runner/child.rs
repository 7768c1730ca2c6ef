//! Starting a job's process and ending it: the OS side of the runner.
//!
//! The child gets its own process group (so a timeout kills the whole job, helpers included),
//! a clean environment, its sandbox ([`crate::sandbox`], applied last before exec) and two
//! extra pipes: the job on fd 3, the channel back on fd 4. Reaping is done by one blocking
//! thread with `wait4`, which is the only call that reports the job's CPU time and peak memory. Before it reaps, it kills what is left of the
//! process group while the group id is still reserved by the unreaped leader.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::sandbox::{Prepared, above_job_descriptors};

/// The job's end of the job pipe, as the runtime reads it.
pub const JOB_FD: RawFd = 3;
/// The job's end of the channel back, as the runtime writes it.
pub const CHANNEL_FD: RawFd = 4;

/// Descriptors the daemon holds for each running job (its pipes, and their share of the warm
/// parents' and cgroups'), with room to spare.
pub const DESCRIPTORS_PER_JOB: u64 = 8;
/// Descriptors the daemon holds whatever runs: broker and emulator connections, the HTTP
/// listener, the store, logs, warm parents.
pub const DESCRIPTORS_BASE: u64 = 256;

/// Why the daemon's descriptor limit cannot fit `engine.concurrency`.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorLimitError {
    #[error("cannot read the daemon's open-files limit (RLIMIT_NOFILE): {0}")]
    Read(nix::Error),
    #[error(
        "engine.concurrency = {concurrency} needs about {needed} open descriptors \
         ({DESCRIPTORS_BASE} + {DESCRIPTORS_PER_JOB} per running job), but the daemon may open \
         only {limit} (its RLIMIT_NOFILE hard limit): raise it (ulimit -n, systemd LimitNOFILE=, \
         docker --ulimit nofile=) or lower engine.concurrency"
    )]
    TooLow {
        concurrency: usize,
        needed: u64,
        limit: u64,
    },
}

/// Raises the daemon's soft open-files limit to its hard limit (1024 is a common soft default,
/// far below the hard one), and checks that `concurrency` running jobs fit in it: a daemon
/// out of descriptors can start no job at all. Returns the limit now in force.
pub fn raise_descriptor_limit(concurrency: usize) -> Result<u64, DescriptorLimitError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(DescriptorLimitError::Read)?;
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let needed = DESCRIPTORS_BASE + DESCRIPTORS_PER_JOB * concurrency as u64;
    if limit < needed {
        return Err(DescriptorLimitError::TooLow {
            concurrency,
            needed,
            limit,
        });
    }
    Ok(limit)
}

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
            // ESRCH (nobody left in the group) is the expected error and means done; EPERM means
            // this daemon may not signal its own job, which the start-up checks rule out.
            if let Err(nix::errno::Errno::EPERM) = killpg(Pid::from_raw(self.pid), signal) {
                tracing::error!(pid = self.pid, signal = %signal, "The daemon may not signal its job's process group (EPERM).");
            }
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
                super::reaper::unregister_own(self.pid);
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
    Ok((
        above_job_descriptors(r.as_fd())?,
        above_job_descriptors(w.as_fd())?,
    ))
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
    // Registered before any reaper scan can see it: its status is `wait_blocking`'s.
    let spawning = super::reaper::spawning();
    let mut child = command.spawn()?;
    super::reaper::register_own(child.id() as i32);
    super::reaper::job_group(child.id() as i32);
    drop(spawning);
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

/// The kernel's `struct clone_args` (`linux/sched.h`, version 2: with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7): `libc`'s constant is an `int`, which this value overflows.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Where the started child failed before its program ran: written to the status pipe.
const FAILED_SETUP: u8 = 1;
const FAILED_EXEC: u8 = 2;

/// [`spawn`], with the child started inside the cgroup `cgroup_dir` by
/// `clone3(CLONE_INTO_CGROUP)`: it never runs outside it, and no process is moved, which would
/// wait for an RCU grace period (~10–15 ms per job when cgroup changes are rare). `Ok(None)`
/// when this kernel has no `clone3` or no `CLONE_INTO_CGROUP` (before 5.7), or the program is
/// not an absolute path: the caller then uses [`spawn`] with the cgroup entered after the fork.
///
/// A raw `clone3` in this multi-threaded process leaves glibc believing the child has the
/// daemon's threads, so between it and `execve` the child makes only system calls that touch
/// nothing but itself (the sandbox's are raw calls or plain wrappers) and allocates nothing:
/// everything it needs is prepared here first.
pub fn spawn_in_cgroup(
    spec: &ChildSpec,
    sandbox: &Prepared,
    cgroup_dir: BorrowedFd<'_>,
) -> std::io::Result<Option<(ChildHandle, ChildPipes)>> {
    if !spec.program.is_absolute() {
        return Ok(None);
    }
    let exec = ExecArgs::of(spec)?;
    let (program, cwd) = (&exec.program, &exec.cwd);
    let argv = nul_terminated(&exec.argv);
    let envp = nul_terminated(&exec.envp);

    let null = above_job_descriptors(std::fs::File::open("/dev/null")?.as_fd())?;
    let (job_read, job_write) = high_pipe()?;
    let (chan_read, chan_write) = high_pipe()?;
    let (out_read, out_write) = high_pipe()?;
    let (err_read, err_write) = high_pipe()?;
    let (status_read, status_write) = high_pipe()?;
    let fds = [
        (null.as_raw_fd(), 0),
        (out_write.as_raw_fd(), 1),
        (err_write.as_raw_fd(), 2),
        (job_read.as_raw_fd(), JOB_FD),
        (chan_write.as_raw_fd(), CHANNEL_FD),
    ];
    let status_fd = status_write.as_raw_fd();

    let mut args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup_dir.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // Registered before any reaper scan can see it: its status is `wait_blocking`'s.
    let spawning = super::reaper::spawning();
    // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy of this address space
    // and runs on with the same stack. `args` lives for the call.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        // SAFETY: the child: only system calls on the values prepared above, then exec.
        unsafe { run_child(&fds, cwd, sandbox, program, &argv, &envp, status_fd) }
    }
    if pid < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            // No clone3, or no CLONE_INTO_CGROUP (E2BIG for a struct larger than it knows).
            Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL) => Ok(None),
            _ => Err(err),
        };
    }
    let pid = pid as i32;
    super::reaper::register_own(pid);
    super::reaper::job_group(pid);
    drop(spawning);
    drop((
        null,
        job_read,
        chan_write,
        out_write,
        err_write,
        status_write,
    ));
    if let Some(err) = setup_failure(&status_read) {
        // SAFETY: reaps our own child, which has exited or is about to.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        super::reaper::unregister_own(pid);
        super::reaper::forget_job_group(pid);
        return Err(err);
    }
    Ok(Some((
        ChildHandle {
            pid,
            reaped: Arc::new(Mutex::new(false)),
        },
        ChildPipes {
            job: job_write,
            channel: chan_read,
            stdout: out_read,
            stderr: err_read,
        },
    )))
}

/// The program, arguments, environment and folder of a job as C strings, made before
/// `clone3` (the child may not allocate).
struct ExecArgs {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
}

impl ExecArgs {
    fn of(spec: &ChildSpec) -> std::io::Result<ExecArgs> {
        let cstring = |bytes: &[u8]| {
            CString::new(bytes).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a NUL byte in the job's program, arguments, environment or folder",
                )
            })
        };
        let program = cstring(spec.program.as_os_str().as_bytes())?;
        let mut argv = vec![program.clone()];
        for arg in &spec.args {
            argv.push(cstring(arg.as_bytes())?);
        }
        let envp = spec
            .env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let cwd = cstring(spec.cwd.as_os_str().as_bytes())?;
        Ok(ExecArgs {
            program,
            argv,
            envp,
            cwd,
        })
    }
}

/// `execve`'s form of a list: pointers to `v`'s strings and a null.
fn nul_terminated(v: &[CString]) -> Vec<*const libc::c_char> {
    let mut out: Vec<*const libc::c_char> = v.iter().map(|c| c.as_ptr()).collect();
    out.push(std::ptr::null());
    out
}

/// Why the child did not reach its program, if it did not: the status pipe closes on exec
/// (close-on-exec) or carries one byte of stage and four of errno.
fn setup_failure(status_read: &OwnedFd) -> Option<std::io::Error> {
    let mut report = [0u8; 5];
    let mut got = 0;
    while got < report.len() {
        // SAFETY: reads into a live local buffer from a descriptor we own.
        let n = unsafe {
            libc::read(
                status_read.as_raw_fd(),
                report[got..].as_mut_ptr().cast(),
                report.len() - got,
            )
        };
        if n > 0 {
            got += n as usize;
        } else if n == 0
            || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
        {
            break;
        }
    }
    if got == 0 {
        return None;
    }
    let errno = i32::from_ne_bytes([report[1], report[2], report[3], report[4]]);
    let err = std::io::Error::from_raw_os_error(errno);
    Some(if report[0] == FAILED_EXEC {
        err
    } else {
        std::io::Error::new(err.kind(), format!("the job's sandbox: {err}"))
    })
}

/// The child of [`spawn_in_cgroup`], between `clone3` and `execve`. Never returns.
///
/// # Safety
/// Only in the child of a fork-like `clone3`, with every argument prepared before it.
unsafe fn run_child(
    fds: &[(RawFd, RawFd)],
    cwd: &CString,
    sandbox: &Prepared,
    program: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    status_fd: RawFd,
) -> ! {
    let fail = |stage: u8, errno: i32| -> ! {
        let e = errno.to_ne_bytes();
        let report = [stage, e[0], e[1], e[2], e[3]];
        // SAFETY: writes a local buffer to our status pipe, then leaves without running any
        // of the parent's exit handlers.
        unsafe {
            libc::write(status_fd, report.as_ptr().cast(), report.len());
            libc::_exit(127)
        }
    };
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: system calls on integers and on memory prepared before the clone.
    unsafe {
        // As `Command` does: an empty signal mask and SIGPIPE back to its default (the Rust
        // runtime ignores it, and an ignored signal stays ignored across exec).
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const libc::sigset_t,
            std::ptr::null_mut::<libc::sigset_t>(),
            std::mem::size_of::<libc::c_ulong>(),
        ) < 0
        {
            fail(FAILED_SETUP, errno());
        }
        if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR {
            fail(FAILED_SETUP, errno());
        }
        if libc::setpgid(0, 0) < 0 {
            fail(FAILED_SETUP, errno());
        }
        // The sources sit at 10 and above, so no move overwrites one still to be moved; dup2
        // clears close-on-exec on the target.
        for &(from, to) in fds {
            if libc::dup2(from, to) < 0 {
                fail(FAILED_SETUP, errno());
            }
        }
        if libc::chdir(cwd.as_ptr()) < 0 {
            fail(FAILED_SETUP, errno());
        }
    }
    if let Err(e) = sandbox.apply_in_child() {
        fail(FAILED_SETUP, e.raw_os_error().unwrap_or(libc::EPERM));
    }
    // SAFETY: null-terminated arrays of pointers into CStrings that outlive the call.
    unsafe {
        libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    fail(FAILED_EXEC, errno())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_limit_is_raised_and_checked_against_the_concurrency() {
        let limit = raise_descriptor_limit(1).expect("one job fits any usable limit");
        let (soft, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .expect("getrlimit");
        assert_eq!((limit, soft), (hard, hard), "soft raised to hard");
        let too_many = usize::try_from(hard / DESCRIPTORS_PER_JOB + 1).expect("fits");
        let err = raise_descriptor_limit(too_many).expect_err("more jobs than descriptors");
        assert!(err.to_string().contains("engine.concurrency"), "{err}");
    }
}
