//! Fork mode: one warm parent interpreter per worker, which forks a fresh child per job.
//!
//! A fresh interpreter costs ~20 ms per job (hundreds with pandas); a fork of a parent that
//! already imported the handler costs ~1 ms. The warm parent ("zygote", the Python side is
//! `hybrid_worker/_zygote.py`) is started exactly like a spawn-mode job: the worker venv's
//! interpreter, `-I -B`, the clean environment, a private folder as its cwd, and the job's
//! sandbox applied between fork and exec. It imports the handler and the worker's `preload`
//! list, then forks one child per job; the child runs that one job and exits with `os._exit`.
//! Each child is forked ahead, as the parent's *spare*: it enters its job's cgroup, leaves the
//! parent's process group and installs its seccomp layer, then waits for its job on a socket of
//! its own, so the fork and that set-up are off the job's path. A spare holds no job data until
//! its own job arrives, and runs no other.
//!
//! Where each sandbox mechanism applies:
//!
//! | mechanism | warm parent (pre-exec, by the daemon) | forked child (by itself, before the job's code) |
//! |---|---|---|
//! | clean environment | the job's allow-list without the job's ids | replaced by the job's exact environment |
//! | rlimits (AS, CPU, NOFILE, FSIZE, CORE, NPROC) | set | inherited (CPU time restarts at 0 at fork) |
//! | `oom_score_adj` 1000 | set | inherited |
//! | user | dropped to `sandbox.user` | inherited (one uid per worker: `sandbox.users` does not apply) |
//! | parent-death signal | SIGKILL when the daemon dies | SIGKILL when the warm parent dies |
//! | `no_new_privs` | set | inherited |
//! | Landlock | the job's rules, its private folder writable | a second layer: the job's rules with only its own temp folder writable (ABI 6: cannot signal the parent) |
//! | seccomp | the job's filter, but `setpgid` allowed | the difference stacked on top: `setpgid` denied again, signals to the parent's pid and group denied |
//! | process group | its own | its own (`setpgid(0, 0)` before the job's filter) |
//! | job cgroup | the daemon's | the job's own, entered first of all (as a spare) through a descriptor of its `cgroup.procs` the daemon opened and sent ahead |
//! | network namespace (egress list) | the worker's egress proxy's, entered before the uid drop | inherited |
//!
//! So the job's code runs under exactly the spawn-mode sandbox, intersected with the parent's
//! (which is no wider). Descriptors: the daemon makes the job's four pipes (and its Landlock
//! ruleset) and passes the child's ends over a SOCK_SEQPACKET control socket with SCM_RIGHTS,
//! with the `cgroup.procs` of the next spare's cgroup; the child moves them to 1, 2, 3, 4 and
//! closes every other descriptor.
//!
//! Killing and accounting: the parent alone signals and reaps its children, so a kill can
//! never hit a reused process-group id; it reports each child's exit status and `wait4` usage
//! back. The parent is restarted at the next job if it dies (logged), and replaced when its
//! worker's venv or folder changes. Nothing of a job survives it: the child never returns into
//! the parent's loop, and the parent never sees a job's input.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, Shutdown, SockFlag, SockType, recv, sendmsg, shutdown,
    socketpair,
};
use serde_json::Value;
use tokio::sync::oneshot;

use super::child::{ChildPipes, ExitInfo};
use crate::egress::Egress;
use crate::python_runtime::ZYGOTE_STUB;
use crate::sandbox::cgroup::JobCgroup;
use crate::sandbox::landlock::OpenedRules;
use crate::sandbox::{Sandbox, SandboxPolicy};
use crate::worker::{NetworkPolicy, Worker};
use protocol::{Control, Reply};

mod protocol;

/// What a warm parent reports when it is ready: its preloads that worked and failed, and the
/// Python threads it runs.
type ReadyReport = (Vec<String>, Vec<String>, Vec<String>);

/// How long a warm parent may take to import its handler and preload list (pandas: ~0.5 s
/// here, much more on a cold disk).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the parent may take to answer a fork request.
const FORK_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message the parent sends.
const MAX_PACKET: usize = 64 * 1024;

/// Starting or using a warm parent failed; the job does not start.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("cannot start the warm parent: {0}")]
    Start(String),
    #[error("the warm parent died ({0})")]
    Died(String),
    #[error("the warm parent could not fork: {0}")]
    Fork(String),
    #[error("cannot prepare the job: {0}")]
    Prepare(String),
}

/// What identifies the code a warm parent imported: when any of it changes, the parent is
/// replaced before the next job.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParentKey {
    python: PathBuf,
    /// Modification times and sizes of the venv's lock file and of the files directly in the
    /// worker's folder (the handler's modules, `worker.toml`).
    fingerprint: Vec<(PathBuf, Option<SystemTime>, u64)>,
    preload: Vec<String>,
}

impl ParentKey {
    fn of(worker: &Worker, python: &Path) -> Self {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&worker.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        if let Some(venv) = python.parent().and_then(Path::parent) {
            files.push(venv.join("hybrid-worker.lock.json"));
        }
        files.sort();
        let fingerprint = files
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(&p).ok();
                let modified = meta.as_ref().and_then(|m| m.modified().ok());
                let len = meta.map_or(0, |m| m.len());
                (p, modified, len)
            })
            .collect();
        Self {
            python: python.to_path_buf(),
            fingerprint,
            preload: worker.spec.preload.clone(),
        }
    }
}

/// What the reader thread forwards to a waiting job.
#[derive(Debug, Default)]
struct Waiters {
    started: HashMap<u64, oneshot::Sender<Result<i32, String>>>,
    exited: HashMap<u64, oneshot::Sender<ExitInfo>>,
}

/// State shared between a parent's handle and its reader thread.
#[derive(Debug, Default)]
struct Shared {
    waiters: Mutex<Waiters>,
    dead: AtomicBool,
}

/// One running warm parent.
#[derive(Debug)]
struct WarmParent {
    key: ParentKey,
    pid: i32,
    /// The daemon's end of the control socket (the reader thread holds a duplicate).
    control: OwnedFd,
    /// Serialises sends, so that a request and its descriptors are one packet in order.
    send_lock: Mutex<()>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// Its private folder; each job's temp folder is made inside it.
    dir: tempfile::TempDir,
    policy: SandboxPolicy,
    /// The paths of its children's Landlock rulesets, opened once (`None`: Landlock is off).
    child_rules: Option<OpenedRules>,
    /// The cgroup of the parent's spare child (forked ahead for the next job), which entered
    /// it when it was forked, so that the move (and the RCU grace period a cgroup move waits
    /// for, ~10 ms when moves are rare) is off the job's path. The next job takes it over; the
    /// daemon sends the following spare's cgroup with that job. Locked from the moment it is
    /// taken until the next one is sent, so the parent sees them in the same order.
    spare_cgroup: Mutex<Option<JobCgroup>>,
    /// Its threads beside the main one once it was ready.
    threads: Mutex<Threads>,
}

/// The threads a warm parent runs beside its main one once its imports are done: each is
/// missing from every forked child, with whatever lock it held at the fork.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Threads {
    /// How many, native ones (a BLAS pool) included, from `/proc/<pid>/task`.
    pub others: usize,
    /// The names of those Python knows of (`threading.enumerate()`).
    pub python: Vec<String>,
}

impl Threads {
    fn of(pid: i32, python: Vec<String>) -> Self {
        let native = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| tasks.count().saturating_sub(1))
            .unwrap_or(0);
        Self {
            others: native.max(python.len()),
            python,
        }
    }
}

impl WarmParent {
    fn send(&self, message: &Control<'_>, fds: &[RawFd]) -> Result<(), WarmError> {
        let bytes = serde_json::to_vec(message).unwrap_or_default();
        let _guard = self.send_lock.lock().unwrap_or_else(|e| e.into_inner());
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
        sendmsg::<()>(
            self.control.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map(|_| ())
        .map_err(|e| WarmError::Died(format!("its control socket: {e}")))
    }

    fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }
}

impl Drop for WarmParent {
    fn drop(&mut self) {
        // The parent reads EOF, kills any child left (there is none once every job holding
        // this handle has ended), and exits; the reader thread then reaps it.
        let _ = shutdown(self.control.as_raw_fd(), Shutdown::Write);
    }
}

/// A job running as a forked child of a warm parent.
#[derive(Debug)]
pub struct ForkedJob {
    parent: Arc<WarmParent>,
    id: u64,
    pub pid: i32,
}

impl ForkedJob {
    /// Sends `signal` to the job's whole process group, through its parent, which alone knows
    /// whether the group still exists.
    pub fn signal_group(&self, signal: Signal) {
        let _ = self.parent.send(
            &Control::Kill {
                id: self.id,
                sig: signal as i32,
            },
            &[],
        );
    }
}

/// The warm parents of one runner, one per worker, started on first use.
#[derive(Debug)]
pub struct WarmPool {
    runtime_dir: PathBuf,
    temp_base: PathBuf,
    sandbox: Sandbox,
    /// The egress proxies: a worker with a `network` list has its warm parent (and so every
    /// child) in its proxy's network namespace.
    egress: Arc<Egress>,
    parents: tokio::sync::Mutex<HashMap<String, Arc<WarmParent>>>,
}

impl WarmPool {
    pub fn new(
        runtime_dir: PathBuf,
        temp_base: PathBuf,
        sandbox: Sandbox,
        egress: Arc<Egress>,
    ) -> Self {
        Self {
            runtime_dir,
            temp_base,
            sandbox,
            egress,
            parents: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Starts `worker`'s warm parent now (if it is not running), so that its first job does
    /// not wait for the imports.
    pub async fn warm_up(&self, worker: &Worker, python: &Path) -> Result<(), WarmError> {
        self.parent(worker, python).await.map(|_| ())
    }

    /// The pid of `worker`'s running warm parent, for tests and reports.
    pub async fn parent_pid(&self, worker: &str) -> Option<i32> {
        let parents = self.parents.lock().await;
        parents.get(worker).filter(|p| !p.is_dead()).map(|p| p.pid)
    }

    /// The threads `worker`'s running warm parent had beside its main one once ready, for
    /// tests and reports.
    pub async fn parent_threads(&self, worker: &str) -> Option<Threads> {
        let parents = self.parents.lock().await;
        parents
            .get(worker)
            .filter(|p| !p.is_dead())
            .map(|p| p.threads.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    async fn parent(&self, worker: &Worker, python: &Path) -> Result<Arc<WarmParent>, WarmError> {
        let key = ParentKey::of(worker, python);
        let mut parents = self.parents.lock().await;
        if let Some(parent) = parents.get(&worker.name) {
            if !parent.is_dead() && parent.key == key {
                return Ok(parent.clone());
            }
            if parent.is_dead() {
                tracing::warn!(worker = %worker.name, pid = parent.pid, "The warm parent had died; starting a new one.");
            } else {
                tracing::info!(worker = %worker.name, pid = parent.pid, "The worker's venv or code changed; replacing its warm parent.");
            }
            // Running jobs keep the old parent alive through their handles; it exits after them.
            parents.remove(&worker.name);
        }
        let parent = Arc::new(self.start(worker, python, key).await?);
        parents.insert(worker.name.clone(), parent.clone());
        Ok(parent)
    }

    async fn start(
        &self,
        worker: &Worker,
        python: &Path,
        key: ParentKey,
    ) -> Result<WarmParent, WarmError> {
        let started = std::time::Instant::now();
        let start_err =
            |what: &str, e: &dyn std::fmt::Display| WarmError::Start(format!("{what}: {e}"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("hybrid-warm-{}-", worker.name))
            .tempdir_in(&self.temp_base)
            .map_err(|e| start_err("its private folder", &e))?;
        let mut policy = self
            .sandbox
            .policy(worker, python, &self.runtime_dir, &self.temp_base);
        if let NetworkPolicy::List(_) = &worker.limits().network {
            let gateway = self
                .egress
                .gateway(&worker.name)
                .map_err(|e| start_err("its egress proxy", &e))?;
            policy.egress = Some(gateway.sandbox());
        }
        if let Some(why) = policy.would_stay_root() {
            return Err(WarmError::Start(why));
        }
        let prepared = policy
            .prepare_warm_parent(dir.path())
            .map_err(|e| start_err("its sandbox", &e))?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| start_err("its control socket", &e))?;
        let theirs = crate::sandbox::above_job_descriptors(theirs.as_fd())
            .map_err(|e| start_err("its control socket", &e))?;
        let theirs_fd = theirs.as_raw_fd();
        let (log_read, log_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| start_err("its output pipe", &e))?;
        let log_write2 = log_write
            .try_clone()
            .map_err(|e| start_err("its output pipe", &e))?;

        let env = super::env::environment(worker, python, dir.path(), []);
        let mut command = Command::new(python);
        command
            .args(super::env::arguments(
                ZYGOTE_STUB,
                &self.runtime_dir,
                worker,
            ))
            .arg(serde_json::to_string(&worker.spec.preload).unwrap_or_else(|_| "[]".into()))
            .env_clear()
            .envs(env)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_write))
            .stderr(Stdio::from(log_write2))
            .process_group(0);
        // SAFETY: as in `child::spawn`: only dup2 and the sandbox's system calls on values
        // prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(theirs_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                prepared.apply_in_child()
            });
        }
        // Its exit status is the reader thread's: registered before a reaper scan can see it.
        let spawning = super::reaper::spawning();
        let child = command
            .spawn()
            .map_err(|e| start_err(&format!("{}", python.display()), &e))?;
        super::reaper::register_own(child.id() as i32);
        drop(spawning);
        drop(command);
        drop(theirs);
        let pid = child.id() as i32;
        let (shared, ready_rx) = watch(&worker.name, pid, child, log_read, &ours)?;
        let parent = WarmParent {
            key,
            pid,
            control: ours,
            send_lock: Mutex::new(()),
            shared,
            next_id: AtomicU64::new(1),
            dir,
            child_rules: policy.fork_child_rules(),
            policy,
            spare_cgroup: Mutex::new(None),
            threads: Mutex::new(Threads::default()),
        };
        self.initialise(&parent, worker, ready_rx).await?;
        tracing::debug!(worker = %worker.name, pid, ms = started.elapsed().as_millis() as u64, "Warm parent started.");
        Ok(parent)
    }

    /// Sends a started warm parent its `init` (the seccomp layer its children add, and the
    /// first spare child's cgroup), waits until it is ready, and records the threads it runs
    /// beside its main one, warning about them.
    async fn initialise(
        &self,
        parent: &WarmParent,
        worker: &Worker,
        ready_rx: oneshot::Receiver<ReadyReport>,
    ) -> Result<(), WarmError> {
        let start_err =
            |what: &str, e: &dyn std::fmt::Display| WarmError::Start(format!("{what}: {e}"));
        let filters = parent
            .policy
            .fork_child_filters(parent.pid as u32)
            .map_err(|e| start_err("the job's seccomp filter", &e))?;
        let first_spare = self
            .sandbox
            .job_cgroup(worker.limits())
            .map_err(|e| start_err("its spare child's cgroup", &e))?;
        let fds: Vec<RawFd> = first_spare.iter().map(|c| c.procs().as_raw_fd()).collect();
        parent.send(
            &Control::Init {
                filters: hex::encode(filters),
                cgroup: first_spare.is_some(),
            },
            &fds,
        )?;
        *parent
            .spare_cgroup
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = first_spare;
        let (preloaded, failed, python_threads) =
            match tokio::time::timeout(READY_TIMEOUT, ready_rx).await {
                Ok(Ok(ready)) => ready,
                Ok(Err(_)) => {
                    return Err(WarmError::Died(
                        "before it was ready; its output is in the log".into(),
                    ));
                }
                Err(_) => {
                    return Err(WarmError::Start(format!(
                        "not ready after {}s",
                        READY_TIMEOUT.as_secs()
                    )));
                }
            };
        tracing::info!(
            worker = %worker.name,
            pid = parent.pid,
            preloaded = ?preloaded,
            failed = ?failed,
            "Warm parent ready."
        );
        let threads = Threads::of(parent.pid, python_threads);
        if threads.others > 0 {
            tracing::warn!(
                worker = %worker.name,
                pid = parent.pid,
                threads = threads.others,
                python_threads = ?threads.python,
                "The warm parent runs other threads after its imports. A fork copies only the \
                 thread that forks: these are gone in every job's child, and a lock one of them \
                 holds at the fork stays held there, which can hang the job. Limit the \
                 library's threads in the worker's env (OPENBLAS_NUM_THREADS=1, \
                 OMP_NUM_THREADS=1, ...), start them in the handler instead of at import, or \
                 use isolation = \"spawn\"."
            );
        }
        *parent.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
        Ok(())
    }

    /// Starts one job in the parent's spare child. `env` gives the job's complete environment
    /// for its temp folder (made here, inside the parent's private folder, and returned); the
    /// pipes returned are the daemon's ends, as in spawn mode. The job's cgroup (when the
    /// daemon has job cgroups) is returned too: the spare entered it when it was forked, before
    /// it could run anything.
    #[allow(clippy::type_complexity)]
    pub async fn fork_job(
        &self,
        worker: &Worker,
        python: &Path,
        env: &(dyn Fn(&Path) -> Vec<(String, String)> + Sync),
    ) -> Result<
        (
            ForkedJob,
            ChildPipes,
            tempfile::TempDir,
            oneshot::Receiver<ExitInfo>,
            Option<JobCgroup>,
        ),
        WarmError,
    > {
        let parent = self.parent(worker, python).await?;
        let prep =
            |what: &str, e: &dyn std::fmt::Display| WarmError::Prepare(format!("{what}: {e}"));
        let workdir = tempfile::Builder::new()
            .prefix("hybrid-job-")
            .tempdir_in(parent.dir.path())
            .map_err(|e| prep("its temp folder", &e))?;
        let ruleset = parent
            .policy
            .prepare_fork_child(workdir.path(), parent.child_rules.as_ref())
            .map_err(|e| prep("its sandbox", &e))?;
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC);
        let (job_read, job_write) = pipe().map_err(|e| prep("a pipe", &e))?;
        let (chan_read, chan_write) = pipe().map_err(|e| prep("a pipe", &e))?;
        let (out_read, out_write) = pipe().map_err(|e| prep("a pipe", &e))?;
        let (err_read, err_write) = pipe().map_err(|e| prep("a pipe", &e))?;
        let mut fds = vec![
            job_read.as_raw_fd(),
            chan_write.as_raw_fd(),
            out_write.as_raw_fd(),
            err_write.as_raw_fd(),
        ];
        if let Some(r) = &ruleset {
            fds.push(r.as_raw_fd());
        }
        let next = self
            .sandbox
            .job_cgroup(worker.limits())
            .map_err(|e| prep("the next spare child's cgroup", &e))?;
        let id = parent.next_id.fetch_add(1, Ordering::SeqCst);
        let (started_tx, started_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = oneshot::channel();
        {
            let mut waiters = parent
                .shared
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            waiters.started.insert(id, started_tx);
            waiters.exited.insert(id, exited_tx);
        }
        let env: serde_json::Map<String, Value> = env(workdir.path())
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let message = Control::Fork {
            id,
            cwd: workdir.path(),
            env,
            landlock: ruleset.is_some(),
            cgroup: false,
        };
        let cgroup = {
            let mut spare = parent
                .spare_cgroup
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut message = message;
            // Last, after the optional ruleset: the next spare's, which the parent keeps.
            if let Some(next) = &next {
                fds.push(next.procs().as_raw_fd());
                if let Control::Fork { cgroup, .. } = &mut message {
                    *cgroup = true;
                }
            }
            parent.send(&message, &fds)?;
            std::mem::replace(&mut *spare, next)
        };
        // The parent holds them now; ours must close, or the pipes would never report EOF.
        drop((job_read, chan_write, out_write, err_write, ruleset));
        let pid = match tokio::time::timeout(FORK_TIMEOUT, started_rx).await {
            Ok(Ok(Ok(pid))) => pid,
            Ok(Ok(Err(why))) => return Err(WarmError::Fork(why)),
            Ok(Err(_)) => return Err(WarmError::Died("while forking the job".into())),
            Err(_) => return Err(WarmError::Fork("no answer to the fork request".into())),
        };
        let job = ForkedJob { parent, id, pid };
        let pipes = ChildPipes {
            job: job_write,
            channel: chan_read,
            stdout: out_read,
            stderr: err_read,
        };
        Ok((job, pipes, workdir, exited_rx, cgroup))
    }
}

/// Starts the two threads that watch a warm parent `pid` of `worker`: one logs what it writes
/// to its output, the other forwards its replies to the jobs waiting for them and, when the
/// parent's end of the control socket closes, reaps it. Returns what they share with the jobs
/// and where its `ready` report arrives.
fn watch(
    worker: &str,
    pid: i32,
    mut child: std::process::Child,
    log_read: OwnedFd,
    ours: &OwnedFd,
) -> Result<(Arc<Shared>, oneshot::Receiver<ReadyReport>), WarmError> {
    let start_err =
        |what: &str, e: &dyn std::fmt::Display| WarmError::Start(format!("{what}: {e}"));
    let name = worker.to_owned();
    std::thread::Builder::new()
        .name(format!("warm-log-{name}"))
        .spawn(move || {
            for line in BufReader::new(std::fs::File::from(log_read)).lines() {
                let Ok(line) = line else { break };
                tracing::warn!(worker = %name, pid, line = %line, "The warm parent wrote to its output.");
            }
        })
        .map_err(|e| start_err("its log thread", &e))?;

    let shared = Arc::new(Shared::default());
    let reader_fd = ours
        .try_clone()
        .map_err(|e| start_err("its control socket", &e))?;
    let (ready_tx, ready_rx) = oneshot::channel();
    let thread_shared = shared.clone();
    let name = worker.to_owned();
    std::thread::Builder::new()
        .name(format!("warm-{name}"))
        .spawn(move || {
            read_replies(reader_fd, &thread_shared, ready_tx);
            thread_shared.dead.store(true, Ordering::SeqCst);
            let waiters = std::mem::take(
                &mut *thread_shared
                    .waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            drop(waiters); // every waiting job sees its parent gone
            let status = child.wait();
            super::reaper::unregister_own(pid);
            tracing::debug!(worker = %name, pid, status = ?status, "The warm parent ended.");
        })
        .map_err(|e| start_err("its reader thread", &e))?;
    Ok((shared, ready_rx))
}

/// The reader thread: forwards the parent's replies to the jobs waiting for them, until the
/// parent's end of the socket closes.
fn read_replies(fd: OwnedFd, shared: &Shared, ready: oneshot::Sender<ReadyReport>) {
    let mut ready = Some(ready);
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) => return,
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        };
        let message = match serde_json::from_slice::<Reply>(&buf[..n]) {
            Ok(message) => message,
            Err(e) => {
                tracing::error!(error = %e, "The warm parent sent a message this daemon does not know; stopping it.");
                return;
            }
        };
        let mut waiters = shared.waiters.lock().unwrap_or_else(|e| e.into_inner());
        match message {
            Reply::Ready {
                preloaded,
                failed,
                threads,
            } => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send((preloaded, failed, threads));
                }
            }
            Reply::Started { id, pid } => {
                if let Some(tx) = waiters.started.remove(&id) {
                    let _ = tx.send(Ok(pid));
                }
            }
            Reply::Failed { id, error } => {
                waiters.exited.remove(&id);
                if let Some(tx) = waiters.started.remove(&id) {
                    let _ = tx.send(Err(error));
                }
            }
            Reply::Exited {
                id,
                code,
                signal,
                cpu_ms,
                max_rss_kb,
            } => {
                if let Some(tx) = waiters.exited.remove(&id) {
                    let _ = tx.send(ExitInfo {
                        code,
                        signal,
                        cpu_ms,
                        max_rss_kb,
                    });
                }
            }
        }
    }
}
