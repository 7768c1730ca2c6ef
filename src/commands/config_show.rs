//! `hybrid-worker config show`: the effective configuration, secrets redacted.

use std::process::ExitCode;

use crate::config::Settings;

pub fn run(settings: &Settings) -> anyhow::Result<ExitCode> {
    print!("{}", settings.redacted_toml()?);
    Ok(ExitCode::SUCCESS)
}
