//! What this kernel and this process can enforce, asked once.
//!
//! Every mechanism of the sandbox is probed rather than assumed, so that the daemon can say at
//! start what it enforces and how, and never drop a protection silently on an older kernel or a
//! stricter container. Job cgroups, which need set-up as well as a probe, are in
//! [`super::cgroup`].

use std::sync::OnceLock;

/// The sandbox features of the running kernel and process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSupport {
    /// The Landlock ABI version (1 = file system, 4 = TCP, 6 = signal and abstract-socket
    /// scoping), or why there is none.
    pub landlock_abi: Result<i32, String>,
    /// Seccomp filters (`SECCOMP_SET_MODE_FILTER`) are available.
    pub seccomp: bool,
    /// The daemon runs as root, so it can (and must) start jobs as another user.
    pub is_root: bool,
    /// Capabilities a root daemon needs to start, stop and clean up jobs of another uid that
    /// its effective set lacks (a container or user namespace may grant uid 0 without them);
    /// empty when it has them all, or is not root.
    pub missing_root_capabilities: Vec<&'static str>,
}

/// What a root daemon does to jobs of another uid, and the capability each needs: hand the
/// job its temp folder, remove what the job left there, change uid and gid, signal the job.
const ROOT_CAPABILITIES: &[(u32, &str)] = &[
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (3, "CAP_FOWNER"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
];

/// The root capabilities missing from this process's effective set (`CapEff` in
/// `/proc/self/status`); all of them when it cannot be read.
fn missing_root_capabilities() -> Vec<&'static str> {
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0);
    ROOT_CAPABILITIES
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

impl KernelSupport {
    /// The support of this kernel, probed on first use.
    pub fn get() -> &'static KernelSupport {
        static SUPPORT: OnceLock<KernelSupport> = OnceLock::new();
        SUPPORT.get_or_init(Self::probe)
    }

    fn probe() -> KernelSupport {
        let is_root = nix::unistd::geteuid().is_root();
        KernelSupport {
            landlock_abi: landlock_abi(),
            seccomp: seccomp_available(),
            is_root,
            missing_root_capabilities: if is_root {
                missing_root_capabilities()
            } else {
                Vec::new()
            },
        }
    }
}

/// Asks the kernel for its Landlock ABI with `landlock_create_ruleset(NULL, 0, VERSION)`.
fn landlock_abi() -> Result<i32, String> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag the call only returns
    // a number; it creates nothing.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if abi > 0 {
        return Ok(i32::try_from(abi).unwrap_or(i32::MAX));
    }
    let err = std::io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel is built without Landlock".into(),
        Some(libc::EOPNOTSUPP) => "Landlock is not enabled at boot (lsm=...,landlock)".into(),
        Some(libc::EPERM) => {
            "the container's seccomp profile blocks the Landlock system calls".into()
        }
        _ => format!("the Landlock probe failed: {err}"),
    })
}

/// `prctl(PR_GET_SECCOMP)` fails with EINVAL when the kernel has no seccomp at all; seccomp
/// filters came with it on every kernel this project supports.
fn seccomp_available() -> bool {
    // SAFETY: PR_GET_SECCOMP takes no pointer and changes nothing.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP) >= 0 }
}
