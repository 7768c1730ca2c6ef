//! The Python runtime `hybrid_worker`, shipped inside the binary.
//!
//! Its files are written once, at start, to a folder named by their hash (so two daemon
//! versions never share one), and every job's interpreter puts that folder first on `sys.path`.
//! `python -I` ignores `PYTHONPATH` and the script's folder, so the path is set by a short
//! `-c` stub instead.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The files of the `hybrid_worker` package, relative to the runtime folder.
const FILES: [(&str, &str); 2] = [
    (
        "hybrid_worker/__init__.py",
        include_str!("python/hybrid_worker/__init__.py"),
    ),
    (
        "hybrid_worker/_bootstrap.py",
        include_str!("python/hybrid_worker/_bootstrap.py"),
    ),
];

/// The `-c` program a job's interpreter runs. Its arguments: runtime folder, worker folder,
/// module, function.
pub const STUB: &str = "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; \
                        from hybrid_worker._bootstrap import run; run()";

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
        let mut hasher = Sha256::new();
        for (name, body) in FILES {
            hasher.update(name.as_bytes());
            hasher.update(body.as_bytes());
        }
        let tag = &hex::encode(hasher.finalize())[..12];
        let dir = base.join(format!("hybrid-worker-runtime-{tag}"));
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
}
