//! `hybrid-worker submit WORKER --input FILE [--wait]`: sends a job as a flow does — ReplyTo the
//! results queue, ReplyToSessionId a fresh session — and, with `--wait`, takes the reply from
//! that session and prints it.

use std::process::ExitCode;
use std::time::Duration;

use super::connect::{Target, client};
use super::{EXIT_FAILED, UsageError};
use crate::broker::{Broker, OutgoingMessage};
use crate::cli::SubmitArgs;
use crate::config::Settings;

pub async fn run(settings: &Settings, args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let input = super::exec::read_input(Some(args.input.as_str()))?;
    if !crate::job::is_valid_worker_name(&args.worker) {
        return Err(UsageError(format!("{:?} is not a worker name", args.worker)).into());
    }
    let target = Target::of(settings)?;
    let sb = client(settings, &target, &settings.queues.jobs)?;
    let job_id = uuid::Uuid::new_v4().to_string();
    let session = format!("submit-{}", uuid::Uuid::new_v4());
    let body = serde_json::json!({ "worker": args.worker, "input": input });
    let message = OutgoingMessage {
        message_id: Some(job_id.clone()),
        correlation_id: Some(format!("submit-{job_id}")),
        reply_to: Some(settings.queues.results.clone()),
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
    Ok(if result["status"] == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}
