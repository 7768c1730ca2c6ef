//! A job's files besides its JSON (claim-check storage, `docs/storage.md`): the input file the
//! daemon hands the job inside its private folder, and the output folder taken out of that
//! folder, out of the job's reach, before the folder is removed.

use std::path::{Path, PathBuf};

/// The files a job gets and leaves, besides its JSON (claim-check storage, `docs/storage.md`).
/// The default hands the job none and discards what it writes into `ctx.output_dir`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobFiles<'a> {
    /// A file the daemon prepared for the job, moved into the job's folder as
    /// `input/<file name>` (read-only) and given to the handler as `ctx.input_path`.
    pub input: Option<&'a Path>,
    /// Where the job's output folder (`ctx.output_dir`) is moved when the job ends: a path
    /// that does not exist yet, in a folder of the daemon's. `None` discards the folder.
    pub keep_outputs: Option<&'a Path>,
    /// The longest result accepted, in bytes, instead of the worker's `max_result_kb` (the
    /// caller stores larger outputs elsewhere).
    pub max_result_bytes: Option<u64>,
}

/// The folder inside a job's private folder that holds its input file.
pub const INPUT_DIR: &str = "input";
/// The folder inside a job's private folder that is its `ctx.output_dir`.
pub const OUTPUT_DIR: &str = "output";

/// Moves the daemon's prepared `file` into the job's folder as `input/<name>`, readable by the
/// job's user and by nobody's write. A rename, as both are under the runner's temp folder; a
/// copy where that folder spans file systems.
pub(super) fn hand_input(workdir: &Path, file: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail =
        |what: &str, e: std::io::Error| format!("cannot hand the job its input ({what}): {e}");
    let dir = workdir.join(INPUT_DIR);
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&dir)
        .map_err(|e| fail("its folder", e))?;
    let name = file.file_name().unwrap_or(std::ffi::OsStr::new("input"));
    let dest = dir.join(name);
    match std::fs::rename(file, &dest) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(file, &dest).map_err(|e| fail("a copy", e))?;
        }
        Err(e) => return Err(fail("a rename", e)),
    }
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o444))
        .map_err(|e| fail("its mode", e))?;
    Ok(dest)
}

/// Why a job's output folder was not kept.
pub(super) enum TakeError {
    /// The job put something else (a link, a file) where its output folder was.
    NotAFolder,
    /// Moving it failed: the daemon's fault.
    Move(String),
}

/// Moves the job's output folder to `dest`, out of the job's reach, before its private folder
/// is removed. What is at `dest` afterwards is checked, not what was there before, so a job
/// that swaps the folder for a link in between gains nothing.
pub(super) fn take_outputs(workdir: &Path, dest: &Path) -> Result<(), TakeError> {
    let source = workdir.join(OUTPUT_DIR);
    match std::fs::symlink_metadata(&source) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TakeError::Move(format!("cannot read ctx.output_dir: {e}"))),
        Ok(_) => {}
    }
    std::fs::rename(&source, dest)
        .map_err(|e| TakeError::Move(format!("cannot keep ctx.output_dir: {e}")))?;
    match std::fs::symlink_metadata(dest) {
        Ok(meta) if meta.file_type().is_dir() => Ok(()),
        Ok(_) => {
            let _ = std::fs::remove_file(dest);
            Err(TakeError::NotAFolder)
        }
        Err(e) => Err(TakeError::Move(format!(
            "cannot read the kept output folder: {e}"
        ))),
    }
}
