//! Logs: `tracing` to stderr, JSON in containers and text on a terminal. Standard output stays
//! free for command results (`exec` prints its result there).

pub mod http;
pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the configured level.
/// One-shot commands (`quiet`) log warnings and errors only, unless a level was configured
/// other than the default `info`: their output is their result, not a running commentary.
pub fn init(settings: &LogSettings, quiet: bool) {
    let level = if quiet && settings.level == "info" {
        "warn"
    } else {
        settings.level.as_str()
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init()
    } else {
        builder.with_target(false).try_init()
    };
}
