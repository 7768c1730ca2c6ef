//! hybrid-worker command line. The emulator subcommand is wired here temporarily; the real
//! CLI adopts `emulator::cli::EmulatorArgs` at merge.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hybrid_worker::emulator::cli::{EmulatorArgs, run};
use hybrid_worker::emulator::entities::EntitiesError;

#[derive(Debug, Parser)]
#[command(name = "hybrid-worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the embedded Service Bus emulator.
    Emulator(EmulatorArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let Command::Emulator(args) = Cli::parse().command;
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A refused entities file is a configuration error (design.md: exit code 2).
            let config_error = e.downcast_ref::<EntitiesError>().is_some();
            ExitCode::from(if config_error { 2 } else { 1 })
        }
    }
}
