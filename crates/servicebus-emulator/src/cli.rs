//! The emulator as a command (`servicebus-emulator`, and `hybrid-worker emulator`): runs it in
//! the foreground and prints the connection string clients should use.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};

use super::sas::SasRule;
use super::{Emulator, EmulatorConfig};

/// Where the emulator listens, keeps its data and finds its entities: the `[emulator]` section
/// of the daemon's configuration, or [`EmulatorSettings::default`] for the standalone binary.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatorSettings {
    /// `host:port` to listen on; port 0 picks a free port.
    pub listen: String,
    /// Directory of the SQLite store.
    pub data_dir: PathBuf,
    /// A `Config.json` in the official emulator's shape; empty means queues `jobs` and
    /// session-enabled `results`.
    pub entities: PathBuf,
    /// The SharedAccessKey of rule RootManageSharedAccessKey (secret).
    pub key: String,
    /// Seconds a connection may stay open without a valid token.
    pub auth_timeout_s: u64,
    /// Connections without a valid token allowed open at once.
    pub max_unauthenticated: usize,
}

impl Default for EmulatorSettings {
    /// The official emulator's AMQP port on the loopback interface and key, a store under
    /// `data/emulator`, the default entities, and the admission bounds of the daemon's
    /// `config/default.toml`.
    fn default() -> Self {
        EmulatorSettings {
            listen: "127.0.0.1:5672".to_owned(),
            data_dir: PathBuf::from("data/emulator"),
            entities: PathBuf::new(),
            key: crate::sas::DEFAULT_KEY.to_owned(),
            auth_timeout_s: 20,
            max_unauthenticated: 64,
        }
    }
}

/// Command-line options of the emulator; each defaults to its [`EmulatorSettings`] (for
/// `hybrid-worker emulator`, the configuration's `[emulator]` section).
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
    let mut config = EmulatorConfig::load(listen, entities.as_deref(), data_dir).with_context(
        || match &entities {
            Some(path) => format!("entities file {}", path.display()),
            None => "the default entities".to_owned(),
        },
    )?;
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
