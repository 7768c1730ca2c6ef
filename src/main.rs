//! The `hybrid-worker` binary: parse the command line, load the configuration, run the command,
//! and turn its end into an exit code (0 success, 1 failed, 2 usage or configuration).

use std::process::ExitCode;

use clap::Parser;
use hybrid_worker::cli::{Cli, Command, ConfigCommand};
use hybrid_worker::commands;
use hybrid_worker::config::{Settings, Sources};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version are not errors; clap knows which is which.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                commands::EXIT_USAGE
            } else {
                0
            });
        }
    };
    if !matches!(
        cli.command,
        Command::Run | Command::Emulator(_) | Command::Exec(_)
    ) {
        // A command whose output is piped into `head` ends quietly, as CLI tools do; the
        // daemons keep Rust's default (ignored SIGPIPE) so a closed socket is an error, not a
        // death.
        // SAFETY: restoring the default disposition of a signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let settings = match Settings::load(&Sources::from_process(cli.config.clone())) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(commands::EXIT_USAGE);
        }
    };
    // Daemons narrate; `exec` shows the handler's own log lines; the rest print results only.
    let narrates = matches!(
        cli.command,
        Command::Run | Command::Emulator(_) | Command::Exec(_)
    );
    hybrid_worker::telemetry::init(&settings.log, !narrates);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(commands::EXIT_FAILED);
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Run => commands::run::run(&settings).await,
            Command::Submit(args) => commands::submit::run(&settings, args).await,
            Command::Exec(args) => commands::exec::run(&settings, args).await,
            Command::Dlq(args) => commands::dlq::run(&settings, args).await,
            Command::Workers { command } => commands::workers::run(&settings, command),
            Command::Emulator(args) => {
                hybrid_worker::emulator::cli::run(&settings.emulator, args.clone())
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Command::Config {
                command: ConfigCommand::Show,
            } => commands::config_show::run(&settings),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            commands::exit_code_for(&e)
        }
    }
}
