//! `servicebus-emulator`: the emulator on its own, without the daemon. Prints the connection
//! string on stdout, logs on stderr, and stops cleanly on SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use servicebus_emulator::cli::{self, EmulatorArgs, EmulatorSettings};
use servicebus_emulator::entities::EntitiesError;
use tracing_subscriber::EnvFilter;

/// An Azure Service Bus emulator: AMQP 1.0 on one port, the official emulator's Config.json and
/// key, messages kept in SQLite.
#[derive(Debug, Parser)]
#[command(name = "servicebus-emulator", version)]
struct Cli {
    #[command(flatten)]
    emulator: EmulatorArgs,
}

/// Exit code of a run that failed (a port in use, a store that cannot be opened).
const EXIT_FAILED: u8 = 1;
/// Exit code of a usage or configuration error (as clap's own), such as a bad `Config.json`.
const EXIT_USAGE: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // RUST_LOG selects what is logged (a tracing filter); info by default.
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli::run(&EmulatorSettings::default(), cli.emulator).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            let usage = error
                .chain()
                .any(|cause| cause.is::<EntitiesError>() || cause.is::<std::net::AddrParseError>());
            ExitCode::from(if usage { EXIT_USAGE } else { EXIT_FAILED })
        }
    }
}
