//! The job's Landlock ruleset: which files it may read, write and execute, and that it may not
//! connect over TCP, signal processes outside its domain, or reach abstract sockets outside it.
//!
//! The ruleset is built in the daemon before the fork, because building it opens a descriptor
//! for every path; the child only calls `landlock_restrict_self` on the finished ruleset's
//! descriptor, which allocates nothing.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, Scope, path_beneath_rules,
};

use crate::worker::NetworkPolicy;

/// The newest Landlock ABI this code was written and tested against. A newer kernel is asked
/// for no more than this (the crate's compatibility contract); an older one gets what it has.
pub const TARGET_ABI: ABI = ABI::V6;

/// What a job may touch on the file system.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsRules {
    /// Read and execute (interpreter, venv, worker folder, runtime, system libraries).
    pub read_only: Vec<PathBuf>,
    /// Read and write but not execute (the job's temp folder, `writable` paths, /dev/null).
    pub read_write: Vec<PathBuf>,
}

/// A ruleset that could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the Landlock ruleset: {0}")]
pub struct LandlockError(String);

/// Builds the ruleset. `None` when the kernel has no Landlock (already reported at start).
pub fn build(rules: &FsRules, network: NetworkPolicy) -> Result<Option<OwnedFd>, LandlockError> {
    let err = |e: landlock::RulesetError| LandlockError(e.to_string());
    let read = AccessFs::from_read(TARGET_ABI);
    let all = AccessFs::from_all(TARGET_ABI);
    let write = all & !AccessFs::Execute;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(err)?
        .scope(Scope::from_all(TARGET_ABI))
        .map_err(err)?;
    if network == NetworkPolicy::Deny {
        // Handled with no rule at all: every TCP bind and connect is refused.
        ruleset = ruleset
            .handle_access(AccessNet::from_all(TARGET_ABI))
            .map_err(err)?;
    }
    let existing = |paths: &[PathBuf]| -> Vec<PathBuf> {
        paths.iter().filter(|p| p.exists()).cloned().collect()
    };
    let created = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(existing(&rules.read_only), read))
        .map_err(err)?
        .add_rules(path_beneath_rules(existing(&rules.read_write), write))
        .map_err(err)?;
    Option::<OwnedFd>::from(created)
        .map(above_job_fds)
        .transpose()
        .map_err(|e| LandlockError(format!("cannot move the ruleset descriptor: {e}")))
}

/// Moves the ruleset's descriptor to 10 or above: the child puts the job's pipes on 3 and 4
/// before it restricts itself, and must not overwrite the ruleset there.
fn above_job_fds(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own into a new one we then own.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Restricts the calling thread (and what it executes) to the ruleset. Called between fork and
/// exec; `no_new_privs` must already be set.
pub fn restrict_self(ruleset: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: the descriptor is a Landlock ruleset we own; flags 0 is the plain restriction.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_restrict_self,
            ruleset.as_raw_fd(),
            0 as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What a kernel with this ABI gets from the ruleset, for reports.
pub fn features(abi: i32) -> String {
    let mut have = vec!["file system"];
    if abi >= 4 {
        have.push("TCP bind/connect");
    }
    if abi >= 6 {
        have.push("signal and abstract-socket scoping");
    }
    let mut text = format!("ABI {abi} ({})", have.join(", "));
    if abi < 6 {
        text.push_str(&format!(
            "; ABI 6 would add what is missing, this kernel has {abi}"
        ));
    }
    text
}
