//! A network namespace holding only loopback, with the egress proxy's listening socket inside
//! it (`docs/egress.md`).
//!
//! Network namespaces belong to threads: a short-lived thread of the daemon unshares one, brings
//! its loopback up, binds the listener on 127.0.0.1 there and opens the namespace's descriptor,
//! then ends. The socket keeps its namespace, so the daemon's tokio accept loop serves it like
//! any other while the proxy's own outbound connections leave from the daemon's namespace. A
//! job's process enters the namespace (`setns`, between fork and exec, before it drops its
//! uid) and can then reach nothing but that listener, by construction of the kernel.
//!
//! Creating a namespace takes `CAP_SYS_ADMIN` (a root daemon); elsewhere the caller falls back to
//! a listener in the daemon's own namespace, and says so.

use std::ffi::CStr;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

/// A new loopback-only namespace and a listener on 127.0.0.1 (a free port) inside it.
#[derive(Debug)]
pub struct Namespace {
    /// `/proc/thread-self/ns/net` of the thread that made it, for `setns`.
    pub fd: OwnedFd,
    pub listener: TcpListener,
}

/// Makes a namespace with its listener, or says why it cannot.
pub fn create() -> Result<Namespace, String> {
    std::thread::Builder::new()
        .name("egress-netns".into())
        .spawn(create_on_this_thread)
        .map_err(|e| format!("cannot start a thread: {e}"))?
        .join()
        .map_err(|_| "the namespace thread failed".to_owned())?
}

/// Whether this process may make network namespaces, tried once: `Err` says why not.
pub fn support() -> &'static Result<(), String> {
    static SUPPORT: OnceLock<Result<(), String>> = OnceLock::new();
    SUPPORT.get_or_init(|| create().map(drop))
}

/// The body of [`create`]'s thread, which ends right after (its namespace lives on in the two
/// descriptors).
fn create_on_this_thread() -> Result<Namespace, String> {
    // SAFETY: unshare with one flag; affects this thread only (CLONE_NEWNET is per thread).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
        let err = std::io::Error::last_os_error();
        return Err(format!(
            "unshare(CLONE_NEWNET): {err} (making a network namespace takes CAP_SYS_ADMIN: a root daemon)"
        ));
    }
    loopback_up().map_err(|e| format!("cannot bring up the namespace's loopback: {e}"))?;
    let fd = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("cannot open /proc/thread-self/ns/net: {e}"))?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("cannot listen on 127.0.0.1 in the namespace: {e}"))?;
    Ok(Namespace {
        fd: fd.into(),
        listener,
    })
}

/// `ip link set lo up` in the calling thread's namespace (a new one starts with it down).
fn loopback_up() -> std::io::Result<()> {
    const LO: &CStr = c"lo";
    // SAFETY: a plain datagram socket, owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero ifreq is valid; the name is copied within its bounds (3 of 16 bytes)
    // and the ioctl reads and writes only the struct.
    unsafe {
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(LO.to_bytes_with_nul()) {
            *dst = *src as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Moves the calling process (a job's child, between fork and exec) into the namespace `fd`.
/// Only a system call: safe between fork and exec.
pub fn enter(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: setns on a namespace descriptor we own; affects the calling thread (the child's
    // only one).
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_lives_in_a_namespace_of_its_own() {
        let ns = match create() {
            Ok(ns) => ns,
            Err(why) => {
                eprintln!("no network namespace here ({why}): nothing to check");
                return;
            }
        };
        let port = ns.listener.local_addr().expect("addr").port();
        // From the test's own namespace, the port on 127.0.0.1 is not that listener.
        ns.listener.set_nonblocking(true).expect("nonblocking");
        let _ = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port));
        assert!(
            ns.listener.accept().is_err(),
            "a connection from outside reached the namespace's listener"
        );
        // From a thread inside it, the listener is reached.
        let fd = ns.fd.try_clone().expect("dup");
        let inside = std::thread::spawn(move || {
            enter(&fd).expect("setns");
            std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
        })
        .join()
        .expect("thread");
        assert!(inside, "a connection from inside did not reach it");
        assert!(ns.listener.accept().is_ok());
    }
}
