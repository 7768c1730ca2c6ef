//! The stop signal: SIGTERM or SIGINT cancels a token that the engine drains on. A second
//! signal ends the process at once, for an operator who does not want to wait.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels the returned token on the first SIGTERM or SIGINT; exits with 130 on the second.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "Stop requested: no new jobs; running jobs may finish."
        );
        cancel.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!(
            "Second stop signal: exiting now; unsettled messages return when their locks expire."
        );
        std::process::exit(130);
    });
    Ok(token)
}
