//! What a succeeded job leaves in storage, and how its reply lists it: an output too large for
//! the message becomes `<results>/<job id>/result.json` (`output_blob`), and each file the
//! handler wrote into `ctx.output_dir` becomes `<results>/<job id>/<file>` (`artifacts`).
//!
//! Names are fixed by the job id and file name, so a redelivered job overwrites its own blobs
//! rather than adding new ones. Only regular files directly in the folder are taken, opened
//! without following links: a handler cannot make the daemon upload a file outside its folder.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Storage, StorageError};
use crate::job::{ErrorKind, JobError};

/// The blob that holds an output over `max_result_kb`.
pub const RESULT_FILE: &str = "result.json";
/// Most files a job may leave in its output folder.
pub const MAX_ARTIFACTS: usize = 100;

/// A blob the daemon wrote, as a reply lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBlob {
    /// `<container>/<blob name>`: what the Blob connector's "Get blob content (V2)" takes.
    pub path: String,
    /// The blob's URL, without a SAS: reading it needs the flow's own access.
    pub url: String,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
    pub content_type: String,
}

/// A file the handler wrote into `ctx.output_dir`, stored as a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// The file's name in `ctx.output_dir`.
    pub name: String,
    #[serde(flatten)]
    pub blob: StoredBlob,
}

/// The storage part of a succeeded job's reply; empty when nothing was stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResultBlobs {
    pub output_blob: Option<StoredBlob>,
    pub artifacts: Vec<Artifact>,
}

/// A job id as one blob-name segment: letters, digits and `-_.:` kept, anything else `_`, so
/// that an id cannot climb out of its folder or start a new one.
pub fn safe_segment(text: &str) -> String {
    let safe: String = text
        .chars()
        .take(200)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    match safe.as_str() {
        "" | "." | ".." => format!("_{safe}"),
        _ => safe,
    }
}

/// The content type a blob gets, from its file name.
pub fn content_type_for(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("csv") => "text/csv",
        Some("json") => "application/json",
        Some("jsonl" | "ndjson") => "application/x-ndjson",
        Some("txt" | "log") => "text/plain",
        Some("html" | "htm") => "text/html",
        Some("xml") => "application/xml",
        Some("pdf") => "application/pdf",
        Some("zip") => "application/zip",
        Some("gz") => "application/gzip",
        Some("xlsx") => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        Some("parquet") => "application/vnd.apache.parquet",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

/// The files a job left in `dir`: regular files directly in it, sorted by name. Anything else
/// (a folder, a link, a file with other hard links) is the handler's error, as is a name that
/// is not a plain file name or more than [`MAX_ARTIFACTS`] files.
pub fn list_outputs(dir: &Path) -> Result<Vec<(String, PathBuf)>, JobError> {
    let refuse = |why: String| JobError::new(ErrorKind::HandlerError, why).permanent();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(refuse(format!("cannot read ctx.output_dir: {e}"))),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| refuse(format!("cannot read ctx.output_dir: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry
            .metadata()
            .map_err(|e| refuse(format!("cannot read {name:?} in ctx.output_dir: {e}")))?;
        if !meta.file_type().is_file() || meta.nlink() != 1 {
            return Err(refuse(format!(
                "ctx.output_dir holds {name:?}, which is not a plain file: only files directly \
                 in the folder are uploaded"
            )));
        }
        if safe_segment(&name) != name || name.starts_with('.') {
            return Err(refuse(format!(
                "ctx.output_dir holds {name:?}: artifact names may have only letters, digits \
                 and '-_.:', and must not start with '.'"
            )));
        }
        files.push((name, entry.path()));
        if files.len() > MAX_ARTIFACTS {
            return Err(refuse(format!(
                "the handler wrote more than {MAX_ARTIFACTS} files into ctx.output_dir"
            )));
        }
    }
    files.sort();
    Ok(files)
}

impl Storage {
    /// Uploads what a succeeded job produced: `output` when its JSON is larger than
    /// `inline_limit` bytes, and the files in `outputs`. Returns the output the reply carries
    /// (`null` when it went to a blob) and the blobs written.
    pub async fn store_results(
        &self,
        job_id: &str,
        output: Value,
        inline_limit: u64,
        outputs: &[(String, PathBuf)],
    ) -> Result<(Value, ResultBlobs), StorageError> {
        let mut blobs = ResultBlobs::default();
        let mut output = output;
        let json = serde_json::to_vec(&output).unwrap_or_default();
        if json.len() as u64 > inline_limit {
            let blob = self.result_blob(job_id, RESULT_FILE);
            let written = self
                .upload_bytes(&blob, json, content_type_for(RESULT_FILE))
                .await?;
            blobs.output_blob = Some(self.stored(written));
            output = Value::Null;
        }
        for (name, path) in outputs {
            let blob = self.result_blob(job_id, name);
            let written = self
                .upload_file(&blob, path, content_type_for(name))
                .await?;
            blobs.artifacts.push(Artifact {
                name: name.clone(),
                blob: self.stored(written),
            });
        }
        Ok((output, blobs))
    }

    fn stored(&self, written: super::transfer::Written) -> StoredBlob {
        StoredBlob {
            path: written.blob.path(),
            url: self.url(&written.blob).to_string(),
            bytes: written.bytes,
            sha256: written.sha256,
            content_type: written.content_type,
        }
    }
}

/// Opens a file for reading without following a final link, and only if what was opened is a
/// regular file with no other hard link (checked on the open file, so a swap after listing the
/// folder gains nothing).
pub fn open_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a plain file", path.display()),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_stay_one_segment() {
        assert_eq!(safe_segment("job-1:attempt-2"), "job-1:attempt-2");
        assert_eq!(safe_segment("../../etc"), ".._.._etc");
        assert_eq!(safe_segment(".."), "_..");
        assert_eq!(safe_segment("a/b c"), "a_b_c");
    }

    #[test]
    fn outputs_are_plain_files_only() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("b.csv"), "x").expect("write");
        std::fs::write(dir.path().join("a.json"), "{}").expect("write");
        let names: Vec<String> = list_outputs(dir.path())
            .expect("plain")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a.json", "b.csv"]);
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("c.txt")).expect("link");
        let err = list_outputs(dir.path()).expect_err("link");
        assert!(
            err.message.contains("not a plain file") && !err.retryable,
            "{err}"
        );
        std::fs::remove_file(dir.path().join("c.txt")).expect("rm");
        std::fs::write(dir.path().join("bad name.csv"), "x").expect("write");
        assert!(list_outputs(dir.path()).is_err());
        assert!(
            list_outputs(&dir.path().join("none"))
                .expect("missing")
                .is_empty()
        );
        assert_eq!(content_type_for("report.CSV"), "text/csv");
    }

    #[test]
    fn only_plain_files_are_opened() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("a.csv");
        std::fs::write(&file, "x").expect("write");
        open_no_follow(&file).expect("a plain file");
        let link = dir.path().join("link.csv");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        assert!(open_no_follow(&link).is_err(), "a link is not followed");
        std::fs::hard_link(&file, dir.path().join("hard.csv")).expect("hard link");
        assert!(
            open_no_follow(&file).is_err(),
            "a file with another name elsewhere"
        );
        assert!(open_no_follow(dir.path()).is_err(), "a folder");
    }
}
