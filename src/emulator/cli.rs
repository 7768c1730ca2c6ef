//! `hybrid-worker emulator`: runs the emulator in the foreground and prints the connection
//! string clients should use.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use super::sas::SasRule;
use super::{Emulator, EmulatorConfig};
use crate::config::EmulatorSettings;

/// Command-line options of `hybrid-worker emulator`; each defaults to the configuration's
/// `[emulator]` section (`HYBRID__EMULATOR__LISTEN`, `…__ENTITIES`, `…__DATA_DIR`).
#[derive(Debug, Clone, clap::Args)]
pub struct EmulatorArgs {
    /// Address to listen on; port 0 picks a free port (the real one is printed).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Entities in the official emulator's Config.json shape (default: `jobs` and
    /// session-enabled `results`).
    #[arg(long, value_name = "FILE")]
    pub entities: Option<PathBuf>,
    /// Directory of the message store.
    #[arg(long, value_name = "DIR", conflicts_with = "in_memory")]
    pub data: Option<PathBuf>,
    /// Keep messages in memory only (lost on exit).
    #[arg(long)]
    pub in_memory: bool,
}

/// The emulator's configuration from the command line over the settings.
pub fn config(settings: &EmulatorSettings, args: &EmulatorArgs) -> anyhow::Result<EmulatorConfig> {
    let listen = match args.listen {
        Some(addr) => addr,
        None => settings.listen.parse().with_context(|| {
            format!("emulator.listen = {:?} is not an address", settings.listen)
        })?,
    };
    let entities = args
        .entities
        .clone()
        .or_else(|| (!settings.entities.as_os_str().is_empty()).then(|| settings.entities.clone()));
    let data_dir = (!args.in_memory).then(|| {
        args.data
            .clone()
            .unwrap_or_else(|| settings.data_dir.clone())
    });
    let mut config = EmulatorConfig::load(listen, entities.as_deref(), data_dir)?;
    config.rules = vec![SasRule {
        key: settings.key.clone(),
        ..SasRule::default()
    }];
    config.auth_timeout = Duration::from_secs(settings.auth_timeout_s);
    config.max_unauthenticated = settings.max_unauthenticated;
    Ok(config)
}

/// Runs until SIGINT or SIGTERM, then closes connections cleanly.
pub async fn run(settings: &EmulatorSettings, args: EmulatorArgs) -> anyhow::Result<()> {
    // Signal handlers first: whoever reads the connection string may stop us right away.
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let config = config(settings, &args)?;
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
