//! The command line: raw arguments become typed commands before anything runs.
//! The command names and flags are a public interface (`docs/contracts.md` §6).

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
    /// Run the daemon: receive jobs from Service Bus (or the embedded emulator when none is
    /// configured), run them, reply, until SIGTERM/SIGINT.
    Run,
    /// Send a job as a flow would and, with --wait, print its reply.
    Submit(SubmitArgs),
    /// Run one job of WORKER from the command line and print its result as JSON.
    ///
    /// Exit code 0 when the job succeeded, 1 when it failed, 2 for usage or configuration errors.
    Exec(ExecArgs),
    /// List, build or verify the workers and their pinned virtualenvs.
    Workers {
        #[command(subcommand)]
        command: WorkersCommand,
    },
    /// List, inspect, replay or purge dead-lettered jobs.
    Dlq(DlqArgs),
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
    /// A local file the handler gets as `ctx.input_path`, as a job's `input_blob` would be.
    #[arg(long, value_name = "FILE")]
    pub input_file: Option<std::path::PathBuf>,
    /// Where to copy the files the handler writes into `ctx.output_dir` (the artifacts a
    /// daemon with storage would upload); without it they are listed and discarded.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub dir: WorkersDir,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The worker to run.
    pub worker: String,
    /// The job's input as JSON: a file, or `-` for standard input (default: `null`).
    #[arg(long, value_name = "FILE|-")]
    pub input: Option<String>,
    /// A blob the daemon fetches for the job (`<container>/<blob name>`): its `input_blob`.
    #[arg(long, value_name = "PATH", conflicts_with = "upload")]
    pub input_blob: Option<String>,
    /// Uploads a local file into the first of `storage.input_containers` and names it as the
    /// job's `input_blob` (needs `[storage]` configured here too).
    #[arg(long, value_name = "FILE")]
    pub upload: Option<std::path::PathBuf>,
    /// The job's SessionId, for a jobs queue that requires sessions (`queues.jobs_sessions`):
    /// jobs with the same KEY run one at a time, in the order sent. Without it, such a queue
    /// gets the job id (a key of its own).
    #[arg(long, value_name = "KEY")]
    pub session: Option<String>,
    /// Wait for the reply on the job's reply session and print it (exit 1 if the job failed).
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait for the reply.
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    pub timeout: f64,
}

#[derive(Debug, Args)]
pub struct DlqArgs {
    /// The queue whose dead letters to act on (default: the configured jobs queue).
    #[arg(long, global = true, value_name = "QUEUE")]
    pub queue: Option<String>,
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// Which dead letters an operation selects.
#[derive(Debug, Clone, Args)]
pub struct DlqFilter {
    /// Only this DeadLetterReason (e.g. HandlerError, MaxAttemptsExceeded).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only jobs for this worker.
    #[arg(long)]
    pub worker: Option<String>,
    /// Only dead letters enqueued at least this long ago (e.g. 30m, 2h, 7d).
    #[arg(long, value_name = "DURATION")]
    pub older_than: Option<String>,
    /// Only dead letters whose description contains this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,
    /// At most this many.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// How a changing operation runs.
#[derive(Debug, Clone, Args)]
pub struct DlqActionOpts {
    /// Show what would be done, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// At most this many messages per second.
    #[arg(long, value_name = "N")]
    pub rate: Option<f64>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (sequence, age, reason, worker, job id, description).
    List {
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Print one dead letter in full.
    Show {
        /// Its sequence number (from `dlq list`).
        #[arg(long)]
        sequence: i64,
    },
    /// Move dead letters back to their queue: the copy is sent, then the dead letter completed.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        #[command(flatten)]
        action: DlqActionOpts,
        /// Replace each job's `input` with this JSON file's content.
        #[arg(long, value_name = "FILE")]
        edit_input: Option<String>,
    },
    /// Delete dead letters. Asks first on a terminal; elsewhere --yes is required.
    Purge {
        #[command(flatten)]
        filter: DlqFilter,
        #[command(flatten)]
        action: DlqActionOpts,
        /// Delete without asking (required when not at a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
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
