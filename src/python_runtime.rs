//! The Python runtime `hybrid_worker`, shipped inside the binary.
//!
//! Its files are written once, at start, to a folder named by their hash (so two daemon
//! versions never share one), and every job's interpreter puts that folder first on `sys.path`.
//! `python -I` ignores `PYTHONPATH` and the script's folder, so the path is set by a short
//! `-c` stub instead.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The files of the `hybrid_worker` package, relative to the runtime folder.
const FILES: [(&str, &str); 4] = [
    (
        "hybrid_worker/__init__.py",
        include_str!("python/hybrid_worker/__init__.py"),
    ),
    (
        "hybrid_worker/_bootstrap.py",
        include_str!("python/hybrid_worker/_bootstrap.py"),
    ),
    (
        "hybrid_worker/_tokens.py",
        include_str!("python/hybrid_worker/_tokens.py"),
    ),
    (
        "hybrid_worker/_zygote.py",
        include_str!("python/hybrid_worker/_zygote.py"),
    ),
];

/// The `-c` program a job's interpreter runs. Its arguments: runtime folder, worker folder,
/// module, function.
pub const STUB: &str = "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; \
                        from hybrid_worker._bootstrap import run; run()";

/// The `-c` program of a warm parent (fork mode, `crate::runner::warm`). Its arguments:
/// runtime folder, worker folder, module, function, the `preload` list as JSON.
pub const ZYGOTE_STUB: &str = "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; \
                               from hybrid_worker._zygote import serve; serve()";

/// An installed copy of the runtime.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub dir: PathBuf,
}

impl Runtime {
    /// Writes the runtime under `base` (if this version is not there yet) and returns it.
    /// Files are written to a temporary name and renamed, so a concurrent start never sees a
    /// half-written file.
    pub fn install(base: &Path) -> std::io::Result<Runtime> {
        let dir = Self::dir_under(base);
        // 0755 whatever the umask allows more: jobs read it, only the daemon writes it.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o755)
            .create(dir.join("hybrid_worker"))?;
        // The base is often the shared /tmp: a folder of this name made by another user would
        // let that user swap the code every job runs (or, through a planted link, make the
        // daemon overwrite a file of its choosing).
        for folder in [dir.clone(), dir.join("hybrid_worker")] {
            check_owned(&folder)?;
        }
        for (name, body) in FILES {
            let path = dir.join(name);
            if std::fs::read(&path).is_ok_and(|b| b == body.as_bytes()) {
                continue;
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, body)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(Runtime { dir })
    }

    /// Where this version of the runtime lives under `base`, installed or not (for reports
    /// such as `workers verify`, which must not write).
    pub fn dir_under(base: &Path) -> PathBuf {
        let mut hasher = Sha256::new();
        for (name, body) in FILES {
            hasher.update(name.as_bytes());
            hasher.update(body.as_bytes());
        }
        let tag = &hex::encode(hasher.finalize())[..12];
        base.join(format!("hybrid-worker-runtime-{tag}"))
    }
}

/// Refuses a folder that is not a real folder owned by this process's user (or root), or that
/// others may write.
fn check_owned(folder: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(folder)?;
    let me = nix::unistd::geteuid().as_raw();
    let owner_ok = meta.uid() == me || meta.uid() == 0;
    if !meta.is_dir() || !owner_ok || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing the runtime folder {}: it must be a folder owned by uid {me} that only its owner may write (found uid {}, mode {:o})",
                folder.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_runtime_folder_others_may_write_is_refused() {
        let base = tempfile::tempdir().expect("tmp");
        let runtime = Runtime::install(base.path()).expect("installs");
        assert!(runtime.dir.join("hybrid_worker/__init__.py").is_file());
        std::fs::set_permissions(&runtime.dir, std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let err = Runtime::install(base.path()).expect_err("refused");
        assert!(
            err.to_string().contains("refusing the runtime folder"),
            "{err}"
        );
    }
}
