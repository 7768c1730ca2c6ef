//! The job's Landlock ruleset: which files it may read, write and execute, and that it may not
//! connect over TCP, signal processes outside its domain, or reach abstract sockets outside it.
//!
//! The ruleset is built in the daemon before the fork, because building it opens a descriptor
//! for every path; the child only calls `landlock_restrict_self` on the finished ruleset's
//! descriptor, which allocates nothing.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, Scope, path_beneath_rules,
};

use super::NetAccess;

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

/// The paths of a ruleset, opened once (`O_PATH`) with the rights each one gets (a file only
/// a file's rights; a path that does not exist is left out). A fork-mode worker's jobs each
/// get the same ruleset but for their own temp folder: the warm parent's paths are opened
/// when it starts, and each job's ruleset only adds them ([`build_from`]), instead of opening,
/// checking and closing every path again per job (five system calls a path).
#[derive(Debug)]
pub struct OpenedRules {
    rules: Vec<(PathFd, BitFlags<AccessFs>)>,
}

impl OpenedRules {
    pub fn open(rules: &FsRules) -> OpenedRules {
        let read = AccessFs::from_read(TARGET_ABI);
        let write = AccessFs::from_all(TARGET_ABI) & !AccessFs::Execute;
        let mut opened = Vec::new();
        for (paths, access) in [(&rules.read_only, read), (&rules.read_write, write)] {
            for path in paths {
                let Ok(fd) = PathFd::new(path) else { continue };
                opened.push((rights_for(&fd, access), fd));
            }
        }
        OpenedRules {
            rules: opened.into_iter().map(|(a, fd)| (fd, a)).collect(),
        }
    }
}

/// What `access` becomes for the path open at `fd`: a file takes only a file's rights (adding
/// directory rights to a file fails); when it cannot be checked, `access` as asked (as
/// `landlock::path_beneath_rules` does).
fn rights_for(fd: &PathFd, access: BitFlags<AccessFs>) -> BitFlags<AccessFs> {
    match nix::sys::stat::fstat(fd.as_fd()) {
        Ok(st) if (st.st_mode & libc::S_IFMT) != libc::S_IFDIR => {
            access & AccessFs::from_file(TARGET_ABI)
        }
        _ => access,
    }
}

/// Builds the ruleset. `None` when the kernel has no Landlock (already reported at start).
pub fn build(rules: &FsRules, network: NetAccess) -> Result<Option<OwnedFd>, LandlockError> {
    build_from(&OpenedRules::open(rules), &[], network)
}

/// Builds the ruleset of `opened`'s paths plus `read_write` (a job's temp folder), opened now.
pub fn build_from(
    opened: &OpenedRules,
    read_write: &[PathBuf],
    network: NetAccess,
) -> Result<Option<OwnedFd>, LandlockError> {
    let err = |e: landlock::RulesetError| LandlockError(e.to_string());
    let all = AccessFs::from_all(TARGET_ABI);
    let write = all & !AccessFs::Execute;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(err)?
        .scope(Scope::from_all(TARGET_ABI))
        .map_err(err)?;
    if network != NetAccess::Allow {
        // Handled: every TCP bind and connect is refused but the rules' (for an egress list,
        // connect to the proxy's port; docs/egress.md).
        ruleset = ruleset
            .handle_access(AccessNet::from_all(TARGET_ABI))
            .map_err(err)?;
    }
    let kept = opened
        .rules
        .iter()
        .map(|(fd, access)| Ok::<_, landlock::RulesetError>(PathBeneath::new(fd.as_fd(), *access)));
    let created = ruleset
        .create()
        .map_err(err)?
        .add_rules(kept)
        .map_err(err)?
        .add_rules(path_beneath_rules(read_write, write))
        .map_err(err)?;
    let created = match network {
        NetAccess::Proxy { port } if port != 0 => created
            .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
            .map_err(err)?,
        _ => created,
    };
    Option::<OwnedFd>::from(created)
        .map(|fd| super::above_job_descriptors(fd.as_fd()))
        .transpose()
        .map_err(|e| LandlockError(format!("cannot move the ruleset descriptor: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn c(path: &std::path::Path) -> CString {
        CString::new(path.as_os_str().as_bytes()).expect("a test path has no NUL")
    }

    /// Opens `path` with `flags` (0o600 when created) and reports whether it worked: only
    /// system calls, so it can run in a child forked from the threaded test binary.
    fn opens(path: &CString, flags: libc::c_int) -> bool {
        // SAFETY: a valid NUL-terminated path; the descriptor is closed at once.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
        if fd >= 0 {
            // SAFETY: our own fresh descriptor.
            unsafe { libc::close(fd) };
        }
        fd >= 0
    }

    #[test]
    fn a_ruleset_allows_what_it_lists_and_nothing_else() {
        let dir = tempfile::tempdir().expect("a temp folder");
        let root = dir.path();
        for sub in ["allowed", "denied", "work"] {
            std::fs::create_dir(root.join(sub)).expect("a folder");
        }
        std::fs::write(root.join("allowed/file"), "x").expect("a file");
        std::fs::write(root.join("denied/file"), "x").expect("a file");
        std::fs::write(root.join("single"), "x").expect("a file");
        let rules = FsRules {
            // A file among the folders takes only a file's rights (else adding it fails), and
            // a path that does not exist is left out.
            read_only: vec![
                root.join("allowed"),
                root.join("single"),
                root.join("missing"),
            ],
            read_write: vec![root.join("work")],
        };
        let Some(ruleset) = build(&rules, NetAccess::Allow).expect("the ruleset builds") else {
            eprintln!("no Landlock on this kernel: nothing to check");
            return;
        };
        let checks = [
            (c(&root.join("allowed/file")), libc::O_RDONLY, true),
            (c(&root.join("single")), libc::O_RDONLY, true),
            (c(&root.join("denied/file")), libc::O_RDONLY, false),
            (
                c(&root.join("allowed/new")),
                libc::O_WRONLY | libc::O_CREAT,
                false,
            ),
            (
                c(&root.join("work/new")),
                libc::O_WRONLY | libc::O_CREAT,
                true,
            ),
        ];
        assert_holds(&ruleset, &checks);
    }

    /// Forks a child that restricts itself to `ruleset` and tries each open; fails the test
    /// naming the first check whose outcome differs.
    fn assert_holds(ruleset: &OwnedFd, checks: &[(CString, libc::c_int, bool)]) {
        // SAFETY: the child makes only system calls on values prepared above, then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: plain system calls in the child; it never returns into the test.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if restrict_self(ruleset).is_err() {
                    libc::_exit(3);
                }
                for (i, (path, flags, allowed)) in checks.iter().enumerate() {
                    if opens(path, *flags) != *allowed {
                        libc::_exit(10 + i as i32);
                    }
                }
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: our own child; `status` is a live local.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "the child did not exit: {status}");
        let code = libc::WEXITSTATUS(status);
        assert_eq!(
            code,
            0,
            "check {} failed (3: restrict_self failed)",
            code - 10
        );
    }

    /// Paths opened once serve every job's ruleset, and each job's temp folder is writable in
    /// its own ruleset only (nothing accumulates from one job to the next).
    #[test]
    fn rules_opened_once_give_each_job_only_its_own_folder() {
        let dir = tempfile::tempdir().expect("a temp folder");
        let root = dir.path();
        for sub in ["code", "job-a", "job-b"] {
            std::fs::create_dir(root.join(sub)).expect("a folder");
        }
        std::fs::write(root.join("code/file"), "x").expect("a file");
        let opened = OpenedRules::open(&FsRules {
            read_only: vec![root.join("code")],
            read_write: vec![],
        });
        let write = libc::O_WRONLY | libc::O_CREAT;
        for (mine, other) in [("job-a", "job-b"), ("job-b", "job-a")] {
            let ruleset = build_from(&opened, &[root.join(mine)], NetAccess::Allow)
                .expect("the ruleset builds");
            let Some(ruleset) = ruleset else {
                eprintln!("no Landlock on this kernel: nothing to check");
                return;
            };
            let checks = [
                (c(&root.join("code/file")), libc::O_RDONLY, true),
                (c(&root.join(mine).join("new")), write, true),
                (c(&root.join(other).join("new")), write, false),
                (c(&root.join("code/new")), write, false),
            ];
            assert_holds(&ruleset, &checks);
        }
    }
}
