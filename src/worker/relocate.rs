//! Copies of what jobs must read, in a place their unprivileged user can reach.
//!
//! A root daemon runs each job as an unprivileged uid ([`crate::sandbox`]), which must be able
//! to open the interpreter, its standard library, the worker's code and its venv. On a
//! developer's machine the default `python3` is often a pyenv build under `/root` (mode 700),
//! and the checkout may sit there too: `nobody` cannot reach either. Rather than run the job as
//! root, the daemon makes root-owned, world-readable copies under `workers.system_dir`:
//!
//! - the interpreter's prefix ([`copy_interpreter`]): its executable, shared libraries and
//!   standard library (without its test suite and without the base `site-packages`, which a
//!   venv never sees), with modification times kept so that the compiled `.pyc` files stay
//!   valid, and with every absolute `RUNPATH` that pointed into the old prefix rewritten to the
//!   same place relative to `$ORIGIN` (a shared-library CPython finds `libpython` that way);
//! - a worker's folder ([`copy_worker`]), named by a hash of its contents, so that an edited
//!   worker gets a fresh copy at the next start.
//!
//! Each copy is made in a temporary folder and renamed into place, so a reader never sees half
//! of one and two daemons starting at once agree on the result.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// A copy that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RelocateError {
    #[error("cannot copy {from} to {to}: {source}")]
    Io {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

/// Written last into a finished copy.
const DONE: &str = ".hybrid-worker-copy";
/// Largest worker folder copied: a worker is code and examples, not data.
const MAX_WORKER_BYTES: u64 = 64 * 1024 * 1024;

/// Copies the interpreter prefix `prefix` (whose executable is `executable`) under `base` and
/// returns the copy's prefix and executable. An existing finished copy of the same prefix is
/// reused.
pub fn copy_interpreter(
    prefix: &Path,
    executable: &Path,
    version: &str,
    base: &Path,
) -> Result<(PathBuf, PathBuf), RelocateError> {
    let relative = executable.strip_prefix(prefix).map_err(|_| {
        RelocateError::Refused(format!(
            "the interpreter {} is not inside its prefix {}",
            executable.display(),
            prefix.display()
        ))
    })?;
    let meta =
        std::fs::metadata(executable).map_err(|source| io(executable, executable, source))?;
    let mut hasher = Sha256::new();
    hasher.update(prefix.as_os_str().as_encoded_bytes());
    hasher.update(version.as_bytes());
    hasher.update(meta.mtime().to_le_bytes());
    hasher.update(meta.size().to_le_bytes());
    let name = format!("python-{version}-{}", &hex::encode(hasher.finalize())[..12]);
    let dest = base.join("python").join(name);
    let result = dest.join(relative);
    if dest.join(DONE).is_file() {
        return Ok((dest, result));
    }
    let skip = |rel: &Path| {
        let parts: Vec<_> = rel.components().collect();
        // lib/python3.X/test, lib/python3.X/site-packages/* and similar test folders.
        matches!(
            parts.as_slice(),
            [Component::Normal(lib), Component::Normal(_), Component::Normal(what), ..]
                if *lib == "lib" && (*what == "test" || *what == "idle_test" || *what == "tests")
        ) || matches!(
            parts.as_slice(),
            [Component::Normal(lib), Component::Normal(_), Component::Normal(sp), _, ..]
                if *lib == "lib" && *sp == "site-packages"
        ) || matches!(parts.first(), Some(Component::Normal(top)) if *top == "include" || *top == "share")
            // Of bin/, only the interpreter itself: the rest are launchers of the base install.
            || (matches!(parts.first(), Some(Component::Normal(top)) if *top == "bin")
                && parts.len() == 2
                && rel != relative)
    };
    publish(&dest, |tmp| {
        copy_tree(prefix, tmp, &skip)?;
        for file in elf_files(tmp) {
            rewrite_runpath(&file, prefix, tmp).map_err(|e| io(&file, &file, e))?;
        }
        Ok(())
    })?;
    Ok((dest, result))
}

/// Copies the worker folder `dir` under `base` (named by a hash of its contents) and returns
/// the copy.
pub fn copy_worker(name: &str, dir: &Path, base: &Path) -> Result<PathBuf, RelocateError> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut files = Vec::new();
    walk(dir, Path::new(""), &mut files).map_err(|e| io(dir, dir, e))?;
    files.sort();
    for rel in &files {
        let path = dir.join(rel);
        let bytes = std::fs::read(&path).map_err(|e| io(&path, &path, e))?;
        total += bytes.len() as u64;
        if total > MAX_WORKER_BYTES {
            return Err(RelocateError::Refused(format!(
                "the worker folder {} holds more than {} MiB; move it where the job user can read it",
                dir.display(),
                MAX_WORKER_BYTES >> 20
            )));
        }
        hasher.update(rel.as_os_str().as_encoded_bytes());
        hasher.update(b"\0");
        hasher.update(&bytes);
    }
    let dest = base
        .join("workers")
        .join(format!("{name}-{}", &hex::encode(hasher.finalize())[..12]));
    if !dest.join(DONE).is_file() {
        publish(&dest, |tmp| copy_tree(dir, tmp, &|_| false))?;
    }
    Ok(dest)
}

/// Makes `dest` by filling a temporary sibling with `fill` and renaming it; when another
/// process finished `dest` first, its copy is kept.
fn publish(
    dest: &Path,
    fill: impl FnOnce(&Path) -> Result<(), RelocateError>,
) -> Result<(), RelocateError> {
    let parent = dest.parent().unwrap_or(Path::new("/"));
    make_dirs(parent).map_err(|e| io(parent, parent, e))?;
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        dest.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| io(&tmp, &tmp, e))?;
    let filled = fill(&tmp).and_then(|()| {
        std::fs::write(tmp.join(DONE), b"").map_err(|e| io(&tmp, &tmp, e))?;
        set_mode(&tmp, 0o755).map_err(|e| io(&tmp, &tmp, e))
    });
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, dest) {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dest.join(DONE).is_file() {
            return Err(io(&tmp, dest, e));
        }
    }
    Ok(())
}

/// Root-owned folders every user may search: the base and its parents as created.
fn make_dirs(dir: &Path) -> std::io::Result<()> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o755)
        .create(dir)?;
    set_mode(dir, 0o755)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Copies `from` into the existing folder `to`: folders 0755, files 0644 (0755 when any execute
/// bit was set), links as links, modification times kept. `skip` gets paths relative to `from`.
fn copy_tree(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<(), RelocateError> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let src_dir = from.join(&rel);
        let entries = std::fs::read_dir(&src_dir).map_err(|e| io(&src_dir, to, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io(&src_dir, to, e))?;
            let rel = rel.join(entry.file_name());
            if skip(&rel) {
                continue;
            }
            let (src, dst) = (from.join(&rel), to.join(&rel));
            let meta = std::fs::symlink_metadata(&src).map_err(|e| io(&src, &dst, e))?;
            let kind = meta.file_type();
            if kind.is_symlink() {
                let target = std::fs::read_link(&src).map_err(|e| io(&src, &dst, e))?;
                // An absolute link into the prefix points into the copy instead.
                let target = match target.strip_prefix(from) {
                    Ok(inside) if target.is_absolute() => to.join(inside),
                    _ => target,
                };
                std::os::unix::fs::symlink(&target, &dst).map_err(|e| io(&src, &dst, e))?;
            } else if kind.is_dir() {
                std::fs::create_dir(&dst).map_err(|e| io(&src, &dst, e))?;
                set_mode(&dst, 0o755).map_err(|e| io(&src, &dst, e))?;
                stack.push(rel);
            } else if kind.is_file() {
                std::fs::copy(&src, &dst).map_err(|e| io(&src, &dst, e))?;
                let mode = if meta.mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                };
                set_mode(&dst, mode).map_err(|e| io(&src, &dst, e))?;
                // A compiled .pyc is valid only while its source keeps its time and size.
                let file = std::fs::File::options()
                    .write(true)
                    .open(&dst)
                    .map_err(|e| io(&src, &dst, e))?;
                if let Ok(modified) = meta.modified() {
                    file.set_modified(modified).map_err(|e| io(&src, &dst, e))?;
                }
            }
            // Sockets, pipes and devices have no place in a prefix or a worker: left out.
        }
    }
    Ok(())
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let rel = rel.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(root, &rel, out)?;
        } else if kind.is_file() {
            out.push(rel);
        }
    }
    Ok(())
}

/// Regular files under `dir` that start with the ELF magic.
fn elf_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if walk(dir, Path::new(""), &mut files).is_err() {
        return Vec::new();
    }
    files
        .into_iter()
        .map(|rel| dir.join(rel))
        .filter(|path| {
            let mut magic = [0u8; 4];
            std::fs::File::open(path)
                .and_then(|mut f| f.read_exact(&mut magic))
                .is_ok()
                && magic == *b"\x7fELF"
        })
        .collect()
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const DT_NULL: i64 = 0;
const DT_STRTAB: i64 = 5;
const DT_RPATH: i64 = 15;
const DT_RUNPATH: i64 = 29;

/// In the copied ELF file `path` (which lies under `new_prefix`), rewrites each `RPATH` or
/// `RUNPATH` entry that starts with `old_prefix` to the same place relative to `$ORIGIN`, in
/// place: the new string is never longer than the old one, and the rest is NUL-padded. A
/// file that is not a 64-bit little-endian ELF, or has no such entry, is left as it is.
fn rewrite_runpath(path: &Path, old_prefix: &Path, new_prefix: &Path) -> std::io::Result<()> {
    let mut file = std::fs::File::options().read(true).write(true).open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let Some(strings) = runpath_strings(&bytes) else {
        return Ok(());
    };
    let Some(origin) = path.parent() else {
        return Ok(());
    };
    for (offset, len) in strings {
        let Some(old) = bytes.get(offset..offset + len) else {
            continue;
        };
        let old = String::from_utf8_lossy(old).into_owned();
        let old_prefix = old_prefix.to_string_lossy();
        let entries: Vec<String> = old
            .split(':')
            .map(|entry| match entry.strip_prefix(old_prefix.as_ref()) {
                Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                    let target = new_prefix.join(rest.trim_start_matches('/'));
                    format!("$ORIGIN/{}", relative(origin, &target).display())
                }
                _ => entry.to_owned(),
            })
            .collect();
        let new = entries.join(":");
        if new == old || new.len() > len {
            continue;
        }
        let mut padded = new.into_bytes();
        padded.resize(len, 0);
        file.seek(SeekFrom::Start(offset as u64))?;
        file.write_all(&padded)?;
    }
    Ok(())
}

/// File offsets and lengths of the `RPATH`/`RUNPATH` strings of a 64-bit little-endian ELF.
fn runpath_strings(b: &[u8]) -> Option<Vec<(usize, usize)>> {
    if b.get(..4)? != b"\x7fELF" || *b.get(4)? != 2 || *b.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut loads = Vec::new();
    let mut dynamic = None;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let kind = u32_at(ph)?;
        let offset = u64_at(ph + 8)?;
        let vaddr = u64_at(ph + 16)?;
        let filesz = u64_at(ph + 32)?;
        match kind {
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC => dynamic = Some((offset, filesz)),
            _ => {}
        }
    }
    let (dyn_off, dyn_size) = dynamic?;
    let (mut strtab, mut paths) = (None, Vec::new());
    let mut at = usize::try_from(dyn_off).ok()?;
    let end = at.checked_add(usize::try_from(dyn_size).ok()?)?;
    while at + 16 <= end {
        let tag = u64_at(at)? as i64;
        let value = u64_at(at + 8)?;
        match tag {
            DT_NULL => break,
            DT_STRTAB => strtab = Some(value),
            DT_RPATH | DT_RUNPATH => paths.push(value),
            _ => {}
        }
        at += 16;
    }
    let strtab = strtab?;
    // The string table's address, as a file offset through the segment that maps it.
    let (vaddr, offset, _) = loads
        .iter()
        .find(|(v, _, size)| strtab >= *v && strtab < v + size)?;
    let table = usize::try_from(strtab - vaddr + offset).ok()?;
    paths
        .into_iter()
        .map(|p| {
            let start = table.checked_add(usize::try_from(p).ok()?)?;
            let len = b.get(start..)?.iter().position(|&c| c == 0)?;
            Some((start, len))
        })
        .collect()
}

/// `to` relative to the folder `from`, both absolute.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to[common..] {
        out.push(part);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

fn io(from: &Path, to: &Path, source: std::io::Error) -> RelocateError {
    RelocateError::Io {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_folder() {
        assert_eq!(
            relative(
                Path::new("/a/p/lib/python3.11/lib-dynload"),
                Path::new("/a/p/lib")
            ),
            PathBuf::from("../..")
        );
        assert_eq!(
            relative(Path::new("/a/p/bin"), Path::new("/a/p/lib")),
            PathBuf::from("../lib")
        );
    }

    #[test]
    fn an_elf_without_a_runpath_is_left_untouched() {
        // The rewrite itself is checked end to end on a real interpreter copy
        // (`tests/it/relocate.rs`), whose libpython is found only through it.
        let tmp = tempfile::tempdir().expect("tmp");
        let copy = tmp.path().join("true");
        std::fs::copy("/bin/true", &copy).expect("copy");
        let before = std::fs::read(&copy).expect("read");
        rewrite_runpath(&copy, Path::new("/nowhere"), tmp.path()).expect("rewrite");
        assert_eq!(std::fs::read(&copy).expect("read"), before);
        assert!(runpath_strings(&before).is_some_and(|s| s.is_empty()));
        assert!(runpath_strings(b"not an elf").is_none());
    }
}
