//! Where the daemon's cgroup v2 folder is: its own cgroup (`/proc/self/cgroup`) under the
//! cgroup2 mount (`/proc/self/mountinfo`), the folder a daemon leaf means, and which
//! controllers the host bound to cgroup v1 instead (a hybrid hierarchy).

use std::path::{Path, PathBuf};

use super::DAEMON_LEAF;

/// The folder to make job cgroups in when the process's own cgroup is `own`: its parent when
/// `own` is the leaf a daemon moved into (this process, or the one it was started beside).
pub(super) fn delegated_from(own: &Path) -> PathBuf {
    match own.parent() {
        Some(parent) if own.file_name() == Some(DAEMON_LEAF.as_ref()) => parent.to_path_buf(),
        _ => own.to_path_buf(),
    }
}

/// The process's own cgroup v2 folder.
pub fn own_cgroup() -> Result<PathBuf, String> {
    let read =
        |path: &str| std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"));
    own_cgroup_in(&read("/proc/self/cgroup")?, &read("/proc/self/mountinfo")?)
}

/// [`own_cgroup`] from the texts of `/proc/self/cgroup` and `/proc/self/mountinfo`.
pub(super) fn own_cgroup_in(cgroup: &str, mountinfo: &str) -> Result<PathBuf, String> {
    let own = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("the process is in no cgroup v2 hierarchy (cgroup v1 only)")?
        .trim();
    let (root, mount_point) = mountinfo
        .lines()
        .find_map(cgroup2_mount)
        .ok_or("cgroup v2 is not mounted")?;
    let relative = Path::new(own).strip_prefix(&root).map_err(|_| {
        format!(
            "the process's cgroup {own} is outside the cgroup2 mount at {} (which shows {})",
            mount_point.display(),
            root.display()
        )
    })?;
    Ok(if relative.as_os_str().is_empty() {
        mount_point
    } else {
        mount_point.join(relative)
    })
}

/// The root and mount point of a `mountinfo` line of a cgroup2 mount.
pub(super) fn cgroup2_mount(line: &str) -> Option<(PathBuf, PathBuf)> {
    let (mount, filesystem) = line.split_once(" - ")?;
    if filesystem.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let mut fields = mount.split_whitespace();
    let root = fields.nth(3)?;
    let mount_point = fields.next()?;
    Some((
        PathBuf::from(unescape_mount(root)),
        PathBuf::from(unescape_mount(mount_point)),
    ))
}

/// Undoes the kernel's octal escapes (`\040` for a space) in mountinfo paths.
pub(super) fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| {
                let value = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                u8::try_from(value).ok()
            });
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The controllers bound to cgroup v1 hierarchies, from the text of `/proc/self/cgroup`
/// (`4:memory:/…`; named hierarchies such as `name=systemd` are no controllers).
pub(super) fn v1_controllers(cgroup: &str) -> Vec<String> {
    cgroup
        .lines()
        .filter_map(|l| {
            let mut fields = l.splitn(3, ':');
            let (id, controllers) = (fields.next()?, fields.next()?);
            (id != "0").then_some(controllers)
        })
        .flat_map(|c| c.split(','))
        .filter(|c| !c.is_empty() && !c.starts_with("name="))
        .map(str::to_owned)
        .collect()
}
