//! `hybrid-worker submit WORKER --input FILE [--wait]`: sends a job as a flow does — ReplyTo the
//! results queue, ReplyToSessionId a fresh session — and, with `--wait`, takes the reply from
//! that session and prints it. `--input-blob PATH` names a blob as the job's input; `--upload
//! FILE` puts a local file into storage first; the blobs a reply lists are printed. `--session
//! KEY` sets the job's SessionId, so jobs with one key run in order (`docs/sessions.md`).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::{EXIT_FAILED, UsageError};
use crate::broker::{Broker, OutgoingMessage};
use crate::cli::SubmitArgs;
use crate::config::Settings;
use crate::servicebus::target::{Target, client};
use crate::storage::BlobRef;
use crate::storage::reference::safe_file_name;
use crate::storage::results::content_type_for;

pub async fn run(settings: &Settings, args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let input = super::exec::read_input(args.input.as_deref())?;
    if !crate::job::is_valid_worker_name(&args.worker) {
        return Err(UsageError(format!("{:?} is not a worker name", args.worker)).into());
    }
    let session_id = job_session(settings, args)?;
    let target = Target::of(settings)?;
    let sb = client(settings, &target, &settings.queues.jobs)?;
    let job_id = uuid::Uuid::new_v4().to_string();
    let session_id = session_id.or_else(|| settings.queues.jobs_sessions.then(|| job_id.clone()));
    let session = format!("submit-{}", uuid::Uuid::new_v4());
    let input_blob = match &args.upload {
        Some(file) => Some(upload(settings, file, &job_id).await?),
        None => args.input_blob.clone(),
    };
    let mut body = serde_json::json!({ "worker": args.worker, "input": input });
    if let Some(path) = &input_blob {
        body["input_blob"] = serde_json::Value::String(path.clone());
    }
    let message = OutgoingMessage {
        message_id: Some(job_id.clone()),
        correlation_id: Some(format!("submit-{job_id}")),
        reply_to: Some(settings.queues.results.clone()),
        session_id,
        reply_to_session_id: Some(session.clone()),
        content_type: Some("application/json".into()),
        body: serde_json::to_vec(&body)?,
        ..Default::default()
    };
    sb.send(&settings.queues.jobs, message).await.map_err(|e| {
        anyhow::anyhow!(
            "sending the job failed: {e}{}",
            if matches!(target, Target::Embedded) {
                " (nothing configured, so the embedded emulator was tried: is `hybrid-worker run` running?)"
            } else {
                ""
            }
        )
    })?;
    eprintln!(
        "submitted job {job_id} to {} (reply session {session})",
        settings.queues.jobs
    );
    if !args.wait {
        println!(
            "{}",
            serde_json::json!({ "job_id": job_id, "reply_session_id": session })
        );
        sb.close().await;
        return Ok(ExitCode::SUCCESS);
    }
    let wait = Duration::from_secs_f64(args.timeout);
    let reply = sb
        .receive_session(&settings.queues.results, &session, wait)
        .await?;
    sb.close().await;
    let Some(reply) = reply else {
        eprintln!(
            "no reply within {}s; the job may still be queued or running (job id {job_id})",
            args.timeout
        );
        return Ok(ExitCode::from(EXIT_FAILED));
    };
    let result: serde_json::Value = serde_json::from_slice(&reply.body)
        .map_err(|e| anyhow::anyhow!("the reply is not JSON: {e}"))?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    let listed = result["output_blob"]
        .as_object()
        .map(|o| ("output", o))
        .into_iter()
        .chain(
            result["artifacts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| Some(("artifact", a.as_object()?))),
        );
    for (what, blob) in listed {
        eprintln!(
            "{what}: {} ({} bytes, sha256 {})",
            blob.get("path").and_then(|p| p.as_str()).unwrap_or("?"),
            blob.get("bytes").and_then(|b| b.as_u64()).unwrap_or(0),
            blob.get("sha256").and_then(|s| s.as_str()).unwrap_or("?")
        );
    }
    Ok(if result["status"] == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// Puts `file` into the first input container as `submit-<job id>/<file name>` and returns the
/// path the job names.
async fn upload(settings: &Settings, file: &Path, job_id: &str) -> anyhow::Result<String> {
    let storage = super::storage(settings)?.ok_or_else(|| {
        UsageError(
            "--upload needs Blob Storage: set storage.connection_string or storage.account_url \
             (HYBRID__STORAGE__CONNECTION_STRING / HYBRID__STORAGE__ACCOUNT_URL)"
                .into(),
        )
    })?;
    if !file.is_file() {
        return Err(UsageError(format!("--upload {}: no such file", file.display())).into());
    }
    let container = storage.upload_container().to_owned();
    let name = safe_file_name(&file.file_name().unwrap_or_default().to_string_lossy());
    let blob = BlobRef {
        container: container.clone(),
        name: format!("submit-{job_id}/{name}"),
    };
    storage.ensure_container(&container).await?;
    let written = storage
        .upload_file(&blob, file, content_type_for(&name))
        .await?;
    eprintln!(
        "uploaded {} to {} ({} bytes, sha256 {})",
        file.display(),
        blob.path(),
        written.bytes,
        written.sha256
    );
    Ok(blob.path())
}

/// Longest SessionId Service Bus accepts.
const MAX_SESSION_ID: usize = 128;

/// The `--session` key, checked: Service Bus refuses an empty one or one over 128 characters.
fn job_session(settings: &Settings, args: &SubmitArgs) -> Result<Option<String>, UsageError> {
    let Some(key) = &args.session else {
        return Ok(None);
    };
    if key.is_empty() || key.chars().count() > MAX_SESSION_ID {
        return Err(UsageError(format!(
            "--session must be 1 to {MAX_SESSION_ID} characters, got {}",
            key.chars().count()
        )));
    }
    if !settings.queues.jobs_sessions {
        eprintln!(
            "note: --session is set but queues.jobs_sessions is false here; a jobs queue without sessions does not keep a key's order"
        );
    }
    Ok(Some(key.clone()))
}
