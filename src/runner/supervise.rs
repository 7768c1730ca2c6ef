//! Watching a started job to its end: its pipes read to their caps while it runs, its
//! deadline, the caller's stop, and SIGTERM then SIGKILL (after [`KILL_GRACE`]) when the
//! runner ends it. Whatever is left in its cgroup dies as soon as its process has ended.

use std::future::Future;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use super::child::ExitInfo;
use super::output::{Captured, ChannelEnd};
use super::{DRAIN_AFTER_EXIT, ExitFuture, JobProcess, KILL_GRACE, KillReason};
use crate::sandbox::cgroup::JobCgroup;

/// What reading a job's pipes gave: its job document written (and tokens served), stdout,
/// stderr, and the channel's end with the number of log records dropped.
pub(super) type Io = (
    (),
    std::io::Result<Captured>,
    std::io::Result<Captured>,
    std::io::Result<(ChannelEnd, u64)>,
);

/// How a job ended, as the runner saw it.
pub(super) struct Watched {
    pub exit: Option<ExitInfo>,
    pub killed: Option<KillReason>,
    pub stdout: Captured,
    pub stderr: Captured,
    pub channel: ChannelEnd,
    pub dropped_logs: u64,
}

/// Runs `io` beside the job's process until the process has ended and its pipes are read
/// (or, for a stray that escaped the group and holds them, [`DRAIN_AFTER_EXIT`] later).
pub(super) async fn watch(
    process: &JobProcess,
    cgroup: Option<&JobCgroup>,
    mut exit: ExitFuture,
    io: impl Future<Output = Io>,
    timeout: Duration,
    stop: &CancellationToken,
) -> Watched {
    tokio::pin!(io);
    let timeout = tokio::time::sleep(timeout);
    tokio::pin!(timeout);
    // SIGTERM first; SIGKILL when the grace period runs out (armed by the first kill).
    let escalation = tokio::time::sleep(Duration::from_secs(365 * 86_400));
    tokio::pin!(escalation);
    let mut escalation_armed = false;
    let mut killed = None;
    let mut io_result = None;
    let exit = loop {
        let kill = tokio::select! {
            waited = &mut exit => break waited,
            done = &mut io, if io_result.is_none() => {
                let too_large = matches!(done.3, Ok((ChannelEnd::TooLarge { .. }, _)));
                io_result = Some(done);
                too_large.then_some(KillReason::ResultTooLarge)
            }
            () = &mut timeout, if killed.is_none() => Some(KillReason::Timeout),
            () = stop.cancelled(), if killed.is_none() => Some(KillReason::Stopped),
            () = &mut escalation, if escalation_armed => {
                kill_all(process, cgroup);
                escalation_armed = false;
                None
            }
        };
        if let Some(reason) = kill.filter(|_| killed.is_none()) {
            killed = Some(reason);
            process.signal_group(Signal::SIGTERM);
            escalation
                .as_mut()
                .reset(tokio::time::Instant::now() + KILL_GRACE);
            escalation_armed = true;
        }
    };
    // The job is over: what is left of it dies now, helpers that left its process group
    // included, so that none of them holds its pipes open.
    if let Some(cgroup) = cgroup {
        cgroup.kill();
    }
    let (_, stdout, stderr, channel) = match io_result {
        Some(done) => done,
        None => match tokio::time::timeout(DRAIN_AFTER_EXIT, &mut io).await {
            Ok(done) => done,
            Err(_) => (
                (),
                Ok(Captured::default()),
                Ok(Captured::default()),
                Ok((
                    ChannelEnd::Garbled("the job's pipes stayed open after it ended".into()),
                    0,
                )),
            ),
        },
    };
    let (channel, dropped_logs) = channel.unwrap_or_else(|e| {
        (
            ChannelEnd::Garbled(format!("reading the channel failed: {e}")),
            0,
        )
    });
    Watched {
        exit,
        killed,
        stdout: stdout.unwrap_or_default(),
        stderr: stderr.unwrap_or_default(),
        channel,
        dropped_logs,
    }
}

/// SIGKILL for the job's process group and everything in its cgroup.
pub(super) fn kill_all(process: &JobProcess, cgroup: Option<&JobCgroup>) {
    process.signal_group(Signal::SIGKILL);
    if let Some(cgroup) = cgroup {
        cgroup.kill();
    }
}
