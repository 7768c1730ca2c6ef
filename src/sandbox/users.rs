//! Whom a job runs as: the daemon's own uid (a non-root daemon), or an unprivileged uid of the
//! pool `sandbox.user`..`sandbox.user + sandbox.users` (a root daemon), and whether that uid can
//! reach what the job must read.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::SandboxSettings;

/// The uids running jobs hold, so that no two running jobs share one while there are enough.
#[derive(Debug, Clone, Default)]
pub(super) struct UidPool {
    free: Arc<Mutex<Vec<u32>>>,
}

impl UidPool {
    pub(super) fn new(settings: &SandboxSettings) -> Self {
        // Reversed so that `pop` hands out the lowest uid first.
        let free = (0..settings.users)
            .rev()
            .filter_map(|i| settings.user.checked_add(i))
            .collect();
        Self {
            free: Arc::new(Mutex::new(free)),
        }
    }

    /// A uid of its own for one job, or `None` when every uid is taken.
    pub(super) fn lease(&self) -> Option<UidLease> {
        let uid = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(UidLease {
            uid,
            pool: self.free.clone(),
        })
    }
}

/// A uid held by one running job; it goes back to the pool when the job's run ends.
#[derive(Debug)]
pub struct UidLease {
    pub(super) uid: u32,
    pool: Arc<Mutex<Vec<u32>>>,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.uid);
    }
}

/// Whom the job runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobUser {
    /// The daemon is not root: the job keeps the daemon's uid (the container's user).
    Same { uid: u32 },
    /// The daemon is root: the job runs as this unprivileged user.
    Drop { uid: u32, gid: u32 },
    /// The daemon is root but `uid` cannot reach `blocked`, which the job needs: the job stays
    /// uid 0 with every capability dropped. Reported at start; weaker (see `enforcement`).
    RootWithoutCapabilities { uid: u32, blocked: PathBuf },
}

/// The first part of `path` (after resolving links) that `uid`/`gid` (with no supplementary
/// groups) cannot search, or read at the end; `None` when it can.
pub fn unreachable_part(path: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let allowed = |meta: &std::fs::Metadata, bit: u32| {
        let mode = meta.mode();
        let shift = if meta.uid() == uid {
            6
        } else if meta.gid() == gid {
            3
        } else {
            0
        };
        mode & (bit << shift) != 0
    };
    let ancestors: Vec<&Path> = real.ancestors().collect();
    for dir in ancestors.iter().rev() {
        let Ok(meta) = std::fs::metadata(dir) else {
            return Some(dir.to_path_buf());
        };
        let last = *dir == real.as_path();
        let ok = if last {
            allowed(&meta, 0o4) && (!meta.is_dir() || allowed(&meta, 0o1))
        } else {
            allowed(&meta, 0o1)
        };
        if !ok {
            return Some(dir.to_path_buf());
        }
    }
    None
}
