//! The job's seccomp filters, compiled in the daemon before the fork.
//!
//! A denied call fails with an errno instead of killing the process, so that Python raises a
//! clear `PermissionError` the handler (and the job's error message) can show. Two filters:
//! the main one answers EPERM; a second makes `clone3` answer ENOSYS, because its flags sit in
//! memory a filter cannot read, and glibc then falls back to `clone`, whose flags it can.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::NetAccess;

/// A filter that could not be built (an unsupported architecture, mostly).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the seccomp filter: {0}")]
pub struct SeccompError(String);

/// Calls no job needs and that would reach past the sandbox: debugging other processes,
/// mounting, new namespaces, kernel keyrings, BPF, perf, modules, io_uring (whose operations
/// bypass the socket rules), and leaving the job's process group (which would let a grandchild
/// escape the kill at the end of the job).
const DENIED: &[(&str, libc::c_long)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("syslog", libc::SYS_syslog),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("setsid", libc::SYS_setsid),
    ("setpgid", libc::SYS_setpgid),
    // Obsolete (glibc uses tgkill), and it addresses threads by id alone: denied so that a
    // job cannot aim at one of the daemon's threads.
    ("tkill", libc::SYS_tkill),
];

/// `clone` flags that create namespaces; `unshare` is denied outright.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// On x86_64 the x32 ABI reaches the same calls with this bit set; the filter covers both
/// numbers so that a kernel with x32 enabled offers no way around it.
#[cfg(target_arch = "x86_64")]
const X32_BIT: i64 = 0x4000_0000;

/// The names of the calls the filter denies, for `workers verify` and `docs/sandbox.md`.
pub fn denied_names() -> impl Iterator<Item = &'static str> {
    DENIED.iter().map(|(name, _)| *name)
}

/// Which filter to build: a job's, or the warm parent's of fork mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    /// The job's filter (spawn mode, and each forked child of fork mode).
    Job,
    /// The warm parent's (fork mode): the job's, except that `setpgid` is allowed, because
    /// each forked child must become the leader of its own process group before it installs
    /// the job's filter on top (filters stack: the stricter answer wins). The parent never
    /// runs a job's code.
    WarmParent,
    /// What a forked child of fork mode adds on top of its warm parent's filter (which it
    /// inherits): `setpgid` denied again, and signals to the warm parent (the first protected
    /// pid) and its group. Filters stack, so the child ends up under exactly the job's filter
    /// with the parent protected too, while the kernel converts and compiles a few dozen
    /// instructions per job instead of the whole filter again.
    ForkChild,
}

/// The compiled filters, in the order they are installed. `protected` are the pids a job may
/// not signal: the daemon's, and in fork mode also its warm parent's.
pub fn compile(network: NetAccess, daemon_pid: u32) -> Result<Vec<BpfProgram>, SeccompError> {
    compile_for(network, &[daemon_pid], FilterKind::Job)
}

/// [`compile`] for the given kind of process, protecting every pid of `protected` (the first is
/// the daemon's; its process group is protected too).
pub fn compile_for(
    network: NetAccess,
    protected: &[u32],
    kind: FilterKind,
) -> Result<Vec<BpfProgram>, SeccompError> {
    let daemon_pid = protected.first().copied().unwrap_or(0);
    let err = |e: seccompiler::BackendError| SeccompError(e.to_string());
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(err)?;
    let arg = |index: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).map_err(err)
    };
    let rule = |conditions: Vec<SeccompCondition>| SeccompRule::new(conditions).map_err(err);

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    if kind == FilterKind::ForkChild {
        let delta = fork_child_filter(protected, arch, &rule, &arg)?;
        return Ok(vec![delta.try_into().map_err(err)?]);
    }
    for (name, nr) in DENIED {
        if kind == FilterKind::WarmParent && *name == "setpgid" {
            continue;
        }
        rules.insert(*nr, Vec::new());
    }
    rules.insert(libc::SYS_socket, socket_rules(network, &rule, &arg)?);
    let mut clone_rules = Vec::new();
    for flag in NAMESPACE_FLAGS {
        clone_rules.push(rule(vec![arg(0, SeccompCmpOp::MaskedEq(*flag), *flag)?])?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    // Signals to the daemon itself, its process group, and every process at once (pid -1).
    // The uid drop or Landlock's signal scope stop these too; this holds even where neither
    // is available, except for a `kill` aimed at one of the daemon's thread ids, which only
    // they stop (`docs/sandbox.md`, "Mechanisms").
    let minus_one = u64::from(u32::MAX);
    // The daemon's process group, as `kill(-pgid)` names it.
    let daemon_group = u64::from(daemon_pid.wrapping_neg());
    let mut kill_rules = vec![
        rule(vec![arg(0, SeccompCmpOp::Eq, minus_one)?])?,
        rule(vec![arg(0, SeccompCmpOp::Eq, daemon_group)?])?,
    ];
    for pid in protected {
        kill_rules.push(rule(vec![arg(0, SeccompCmpOp::Eq, u64::from(*pid))?])?);
    }
    rules.insert(libc::SYS_kill, kill_rules);
    add_signal_rules(&mut rules, protected, &rule, &arg)?;
    add_x32(&mut rules);
    let main = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, Vec::new());
    let clone3 = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    let main: BpfProgram = main.try_into().map_err(err)?;
    let clone3: BpfProgram = clone3.try_into().map_err(err)?;
    Ok(vec![main, clone3])
}

type Rule<'a> = &'a dyn Fn(Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError>;
type Arg<'a> = &'a dyn Fn(u8, SeccompCmpOp, u64) -> Result<SeccompCondition, SeccompError>;

/// What a forked child adds to its warm parent's filter: no `setpgid` (it has its group), no
/// signals to the parent or the daemon.
fn fork_child_filter(
    protected: &[u32],
    arch: TargetArch,
    rule: Rule<'_>,
    arg: Arg<'_>,
) -> Result<SeccompFilter, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_setpgid, Vec::new());
    let mut kill_rules = Vec::new();
    for pid in protected {
        kill_rules.push(rule(vec![arg(0, SeccompCmpOp::Eq, u64::from(*pid))?])?);
        kill_rules.push(rule(vec![arg(
            0,
            SeccompCmpOp::Eq,
            u64::from(pid.wrapping_neg()),
        )?])?);
    }
    rules.insert(libc::SYS_kill, kill_rules);
    add_signal_rules(&mut rules, protected, rule, arg)?;
    add_x32(&mut rules);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| SeccompError(e.to_string()))
}

/// The `socket` calls refused. With "deny" only local (AF_UNIX) sockets are left; with "allow"
/// all but raw packet sockets; with an egress list local sockets and IPv4 TCP (to reach the
/// proxy), nothing else: no UDP, so that without a namespace of its own a job cannot send
/// datagrams anywhere, and no other protocol on a stream socket (SCTP, MPTCP), which
/// Landlock's TCP rules would not see.
fn socket_rules(
    network: NetAccess,
    rule: Rule<'_>,
    arg: Arg<'_>,
) -> Result<Vec<SeccompRule>, SeccompError> {
    Ok(match network {
        NetAccess::Deny => vec![rule(vec![arg(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?])?],
        NetAccess::Allow => vec![rule(vec![arg(
            0,
            SeccompCmpOp::Eq,
            libc::AF_PACKET as u64,
        )?])?],
        NetAccess::Proxy { .. } => {
            let inet = libc::AF_INET as u64;
            let stream = libc::SOCK_STREAM as u64;
            let flags = [
                0,
                libc::SOCK_CLOEXEC as u64,
                libc::SOCK_NONBLOCK as u64,
                (libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64,
            ];
            let mut not_stream = vec![arg(0, SeccompCmpOp::Eq, inet)?];
            for f in flags {
                not_stream.push(arg(1, SeccompCmpOp::Ne, stream | f)?);
            }
            vec![
                rule(vec![
                    arg(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?,
                    arg(0, SeccompCmpOp::Ne, inet)?,
                ])?,
                rule(not_stream)?,
                rule(vec![
                    arg(0, SeccompCmpOp::Eq, inet)?,
                    arg(2, SeccompCmpOp::Ne, 0)?,
                    arg(2, SeccompCmpOp::Ne, libc::IPPROTO_TCP as u64)?,
                ])?,
            ]
        }
    })
}

/// Denies the calls that signal a process by pid (other than `kill`) when they name one of
/// `protected`.
fn add_signal_rules(
    rules: &mut BTreeMap<i64, Vec<SeccompRule>>,
    protected: &[u32],
    rule: &dyn Fn(Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError>,
    arg: &dyn Fn(u8, SeccompCmpOp, u64) -> Result<SeccompCondition, SeccompError>,
) -> Result<(), SeccompError> {
    for nr in [
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
        libc::SYS_pidfd_open,
    ] {
        let mut by_pid = Vec::new();
        for pid in protected {
            by_pid.push(rule(vec![arg(0, SeccompCmpOp::Eq, u64::from(*pid))?])?);
        }
        rules.insert(nr, by_pid);
    }
    Ok(())
}

/// On x86_64, the same rules for the x32 numbers of every call.
fn add_x32(rules: &mut BTreeMap<i64, Vec<SeccompRule>>) {
    #[cfg(target_arch = "x86_64")]
    {
        let native: Vec<(i64, Vec<SeccompRule>)> =
            rules.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (nr, r) in native {
            rules.insert(nr | X32_BIT, r);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = rules;
}

/// Installs compiled filters on the calling thread. Called between fork and exec: it only
/// makes system calls on memory prepared before the fork.
pub fn install(filters: &[BpfProgram]) -> std::io::Result<()> {
    for filter in filters {
        seccompiler::apply_filter(filter).map_err(|e| match e {
            seccompiler::Error::Seccomp(io) | seccompiler::Error::Prctl(io) => io,
            _ => std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
    }
    Ok(())
}

/// The filters as bytes, for a process that installs them itself (a forked child of fork mode,
/// in Python): for each filter, its instruction count as a little-endian `u32`, then its
/// `struct sock_filter` instructions in native layout (`u16 code, u8 jt, u8 jf, u32 k`).
pub fn to_bytes(filters: &[BpfProgram]) -> Vec<u8> {
    let mut out = Vec::new();
    for filter in filters {
        out.extend_from_slice(&(filter.len() as u32).to_le_bytes());
        for ins in filter {
            out.extend_from_slice(&ins.code.to_ne_bytes());
            out.push(ins.jt);
            out.push(ins.jf);
            out.extend_from_slice(&ins.k.to_ne_bytes());
        }
    }
    out
}
