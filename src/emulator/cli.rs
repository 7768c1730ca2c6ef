//! `hybrid-worker emulator`: runs the emulator in the foreground and prints the connection
//! string clients should use.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use super::{Emulator, EmulatorConfig};

/// Command-line options of `hybrid-worker emulator`.
#[derive(Debug, Clone, clap::Args)]
pub struct EmulatorArgs {
    /// Address to listen on; port 0 picks a free port (the real one is printed).
    #[arg(
        long,
        default_value = "127.0.0.1:5672",
        env = "HYBRID__EMULATOR__LISTEN"
    )]
    pub listen: SocketAddr,
    /// Entities in the official emulator's Config.json shape (default: `jobs` and
    /// session-enabled `results`).
    #[arg(long, env = "HYBRID__EMULATOR__ENTITIES")]
    pub entities: Option<PathBuf>,
    /// Directory of the message store.
    #[arg(
        long,
        env = "HYBRID__EMULATOR__DATA_DIR",
        default_value = "emulator-data",
        conflicts_with = "in_memory"
    )]
    pub data: PathBuf,
    /// Keep messages in memory only (lost on exit).
    #[arg(long)]
    pub in_memory: bool,
}

/// Runs until SIGINT or SIGTERM, then closes connections cleanly.
pub async fn run(args: EmulatorArgs) -> anyhow::Result<()> {
    // Signal handlers first: whoever reads the connection string may stop us right away.
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let data_dir = (!args.in_memory).then(|| args.data.clone());
    let config = EmulatorConfig::load(args.listen, args.entities.as_deref(), data_dir)?;
    let handle = Emulator::start(config)
        .await
        .context("starting the emulator")?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", handle.connection_string())?;
    stdout.flush()?;
    tracing::info!(addr = %handle.local_addr(), in_memory = args.in_memory, "Service Bus emulator is listening.");
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("Service Bus emulator is shutting down.");
    handle.shutdown().await;
    Ok(())
}
