//! The daemon as a child subreaper: every orphan a job leaves reaches the daemon, not PID 1,
//! and is reaped at once.
//!
//! A job's helpers that outlive it (a fork bomb's processes killed with the job's group, a
//! grandchild that escaped it) are orphans: the kernel hands them to the nearest ancestor that
//! asked for them (`PR_SET_CHILD_SUBREAPER`), else to PID 1. Until someone reaps them their
//! zombies count against the job uid's process limit (`RLIMIT_NPROC`), so the next job of that
//! uid cannot fork. PID 1 is not always a prompt reaper (a host's init, a container's pause
//! process, or the daemon itself when it is PID 1), so the daemon takes them: [`install`]
//! makes it a subreaper and starts a thread that reaps them.
//!
//! The daemon also has children that other code waits for: job processes (spawn mode), warm
//! parents, and short commands (`pip`, the interpreter probe). Reaping one of those would
//! steal its exit status, so a child is reaped here only when it is a zombie that
//! - is not registered as the daemon's own ([`register_own`], done under [`spawning`] so that
//!   no scan runs between the fork and the registration), and
//! - is outside the daemon's process group, and
//! - belongs to a job: its process group is a registered job's group ([`job_group`]), or it
//!   runs as another uid than the daemon, or it left the daemon's session.
//!
//! A command of the daemon's own (same uid, same group) is never touched, whoever started it.
//! When a job ends the runner calls [`end_job_group`], which kills what is left of the job's
//! group among the daemon's children and reaps it before the next job can start.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// How often the reaper thread looks for orphans that came after their job's end.
const SCAN_EVERY: Duration = Duration::from_millis(500);
/// How long [`end_job_group`] waits for a killed group's members to die.
const GROUP_GRACE: Duration = Duration::from_secs(2);
/// A job group whose job ended is forgotten once none of its members is a child of the daemon,
/// or after this long.
const GROUP_MEMORY: Duration = Duration::from_secs(3600);

/// The subreaper's state, shared by the runner and the reaper thread.
#[derive(Debug, Default)]
struct Reaper {
    /// Held for reading from before a fork until its child is registered; a scan holds it for
    /// writing, so it never sees an own child that is not registered yet.
    spawn: RwLock<()>,
    /// Children that other code waits for.
    own: Mutex<HashSet<i32>>,
    /// Process groups of jobs: their pgid and, once the job ended, when.
    groups: Mutex<HashMap<i32, Option<Instant>>>,
    /// Orphans reaped since the start, for tests and logs.
    reaped: std::sync::atomic::AtomicU64,
}

fn state() -> &'static Reaper {
    static STATE: OnceLock<Reaper> = OnceLock::new();
    STATE.get_or_init(Reaper::default)
}

/// Makes this process a child subreaper and starts the reaper thread (once per process).
/// Returns why not when the kernel refuses (Linux before 3.4): orphans then go to PID 1.
pub fn install() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            // SAFETY: prctl with integer arguments only changes this process's attributes.
            let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
            if rc != 0 {
                return Err(format!(
                    "prctl(PR_SET_CHILD_SUBREAPER): {}",
                    std::io::Error::last_os_error()
                ));
            }
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(run)
                .map(|_| ())
                .map_err(|e| format!("cannot start the reaper thread: {e}"))
        })
        .clone()
}

/// Held from before a fork of a child that other code waits for until [`register_own`].
#[derive(Debug)]
pub struct SpawnGuard(#[allow(dead_code)] RwLockReadGuard<'static, ()>);

/// Taken before forking a child of the daemon's own; see the module doc.
pub fn spawning() -> SpawnGuard {
    SpawnGuard(state().spawn.read().unwrap_or_else(|e| e.into_inner()))
}

/// Registers a child whose exit status other code collects; [`unregister_own`] after reaping.
pub fn register_own(pid: i32) {
    lock(&state().own).insert(pid);
}

/// The child `pid` was reaped by its owner.
pub fn unregister_own(pid: i32) {
    lock(&state().own).remove(&pid);
}

/// Registers the process group of a starting job (its leader's pid).
pub fn job_group(pgid: i32) {
    lock(&state().groups).insert(pgid, None);
}

/// The job of group `pgid` never ran (its process failed before exec and was reaped by its
/// owner): nothing can be left of it.
pub fn forget_job_group(pgid: i32) {
    lock(&state().groups).remove(&pgid);
}

/// Orphans reaped by this process since it started.
pub fn reaped() -> u64 {
    state().reaped.load(std::sync::atomic::Ordering::Relaxed)
}

/// The job of group `pgid` ended: kills what is left of the group among this process's
/// children (orphans the kernel handed here) and reaps them, waiting up to two seconds for
/// them to die. Runs on a blocking thread.
pub fn end_job_group(pgid: i32) {
    let deadline = Instant::now() + GROUP_GRACE;
    loop {
        let alive = scan(Some(pgid));
        if alive == 0 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if let Some(ended) = lock(&state().groups).get_mut(&pgid) {
        *ended = Some(Instant::now());
    }
}

fn run() {
    loop {
        std::thread::sleep(SCAN_EVERY);
        scan(None);
        forget_old_groups();
    }
}

/// One pass over this process's children: reaps every zombie that is a job's orphan; with
/// `kill_group`, also SIGKILLs live children in that group. Returns how many live children of
/// that group are left (0 without one).
fn scan(kill_group: Option<i32>) -> usize {
    let st = state();
    let _no_spawns = st.spawn.write().unwrap_or_else(|e| e.into_inner());
    let me = Identity::of_self();
    let own = lock(&st.own).clone();
    let groups: HashSet<i32> = lock(&st.groups).keys().copied().collect();
    let mut alive_in_group = 0;
    for pid in children() {
        if own.contains(&pid) {
            continue;
        }
        let Some(child) = ChildInfo::read(pid) else {
            continue;
        };
        if child.pgid == me.pgid {
            continue;
        }
        let a_jobs = groups.contains(&child.pgid) || child.uid != me.uid || child.sid != me.sid;
        if !a_jobs {
            continue;
        }
        if child.zombie {
            reap(pid);
        } else if kill_group == Some(child.pgid) {
            // SAFETY: `pid` is this process's unreaped child, so the number cannot name another
            // process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            alive_in_group += 1;
        }
    }
    alive_in_group
}

fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waits only for `pid`, a zombie child of this process; `status` is a live local.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if rc == pid {
        state()
            .reaped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(pid, "Reaped an orphan of a job.");
    }
}

fn forget_old_groups() {
    let children: HashSet<i32> = children()
        .into_iter()
        .filter_map(ChildInfo::read)
        .map(|c| c.pgid)
        .collect();
    lock(&state().groups).retain(|pgid, ended| match ended {
        None => true,
        Some(at) => children.contains(pgid) && at.elapsed() < GROUP_MEMORY,
    });
}

/// This process's children, from every thread's `children` list (an orphan is handed to one
/// of the process's threads), or from a walk of `/proc` where the kernel has no such file.
fn children() -> Vec<i32> {
    let mut out = Vec::new();
    let mut have_lists = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                have_lists = true;
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    if !have_lists {
        let me = std::process::id() as i32;
        if let Ok(procs) = std::fs::read_dir("/proc") {
            out.extend(
                procs
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|pid| ChildInfo::read(*pid).is_some_and(|c| c.ppid == me)),
            );
        }
    }
    out
}

/// What decides whether a process is a job's orphan.
#[derive(Debug, Clone, Copy)]
struct Identity {
    uid: u32,
    pgid: i32,
    sid: i32,
}

impl Identity {
    fn of_self() -> Self {
        // SAFETY: these calls only read this process's ids.
        unsafe {
            Identity {
                uid: libc::getuid(),
                pgid: libc::getpgrp(),
                sid: libc::getsid(0),
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct ChildInfo {
    ppid: i32,
    pgid: i32,
    sid: i32,
    uid: u32,
    zombie: bool,
}

impl ChildInfo {
    /// Reads `/proc/<pid>/stat` and the real uid; `None` when the process is gone.
    fn read(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (state, ppid, pgid, sid) = parse_stat(&stat)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())?;
        Some(ChildInfo {
            ppid,
            pgid,
            sid,
            uid,
            zombie: matches!(state, 'Z' | 'X'),
        })
    }
}

/// State, parent, process group and session from a `/proc/<pid>/stat` line. The command name
/// is in parentheses and may hold anything, so the fields are read after its last `)`.
fn parse_stat(stat: &str) -> Option<(char, i32, i32, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    let sid = fields.next()?.parse().ok()?;
    Some((state, ppid, pgid, sid))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let line = "4242 (a (b) c) Z 1 4240 4200 0 -1 4194560 0 0";
        assert_eq!(parse_stat(line), Some(('Z', 1, 4240, 4200)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn an_orphan_of_a_job_is_reaped_and_an_own_child_is_left_to_its_owner() {
        install().expect("subreaper");
        // An own child in its own group, registered: must survive a scan as a zombie.
        let guard = spawning();
        let own = std::process::Command::new("true")
            .process_group(0)
            .spawn()
            .expect("spawn");
        let own_pid = own.id() as i32;
        register_own(own_pid);
        drop(guard);
        // A "job" whose child outlives it: the job (in its own group) forks `sleep`-like child
        // that exits after the job, so the kernel hands the grandchild to this subreaper.
        let job = std::process::Command::new("sh")
            .args(["-c", "(sleep 0.2) & exit 0"])
            .process_group(0)
            .spawn()
            .expect("spawn job");
        let job_pid = job.id() as i32;
        register_own(job_pid);
        job_group(job_pid);
        let mut job = job;
        assert!(job.wait().expect("wait").success());
        unregister_own(job_pid);
        let before = reaped();
        end_job_group(job_pid);
        assert!(
            reaped() > before,
            "the job's orphan was not reaped ({before} before)"
        );
        // The own child is still there for its owner.
        let mut own = own;
        assert!(own.wait().expect("own child's status").success());
        unregister_own(own_pid);
    }

    use std::os::unix::process::CommandExt;
}
