//! The command line: raw arguments become typed commands before anything runs.
//! The command names and flags are a public interface (`design.md`, "Stable names").

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "hybrid-worker",
    version,
    about = "Runs Power Platform jobs from Azure Service Bus in isolated Python processes."
)]
pub struct Cli {
    /// A configuration file layered over the embedded defaults (also: HYBRID_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one job of WORKER from the command line and print its result as JSON.
    ///
    /// Exit code 0 when the job succeeded, 1 when it failed, 2 for usage or configuration errors.
    Exec(ExecArgs),
    /// List, build or verify the workers and their pinned virtualenvs.
    Workers {
        #[command(subcommand)]
        command: WorkersCommand,
    },
    /// Run the embedded Service Bus emulator in the foreground and print its connection string.
    Emulator(crate::emulator::cli::EmulatorArgs),
    /// Show the effective configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

/// Where workers are found; every command that reads workers takes it.
#[derive(Debug, Clone, Args)]
pub struct WorkersDir {
    /// The folder of workers (default: the configured workers.dir, `workers`).
    #[arg(long, value_name = "DIR")]
    pub workers_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The worker to run (its folder name).
    pub worker: String,
    /// The job's input as JSON: a file, or `-` for standard input (default: `null`).
    #[arg(long, value_name = "FILE|-")]
    pub input: Option<String>,
    /// Seconds before the job is stopped (capped by the worker's timeout_s).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub dir: WorkersDir,
}

#[derive(Debug, Subcommand)]
pub enum WorkersCommand {
    /// List the workers with their limits and venv state.
    List {
        #[command(flatten)]
        dir: WorkersDir,
    },
    /// Build the pinned venv of each worker (or of NAME) that is missing or stale.
    Build {
        /// Build only this worker.
        name: Option<String>,
        /// Rebuild even when the venv is up to date.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        dir: WorkersDir,
    },
    /// Check every worker's venv against its lock; exit 1 if any would be refused.
    Verify {
        #[command(flatten)]
        dir: WorkersDir,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration as TOML, secrets redacted.
    Show,
}
