//! Which Service Bus the daemon and the CLI talk to: the connection string, else the namespace
//! with an Entra ID credential, else the embedded emulator on `emulator.listen` (unless
//! `servicebus.embedded` = "never", where nothing configured is refused).

use std::time::Duration;

use crate::config::{EmbeddedEmulator, Settings};
use crate::emulator::EmulatorHandle;
use crate::servicebus::client::{ServiceBusBroker, ServiceBusConfig};
use crate::servicebus::connection_string::ConnectionString;
use crate::servicebus::credential::{Credential, entra_credential};

/// Why no client could be made for the configured target: each is the operator's to fix.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("servicebus.connection_string: {0}")]
    ConnectionString(String),
    #[error(
        "no Service Bus is configured and servicebus.embedded = \"never\" forbids the embedded \
         emulator: set servicebus.connection_string (HYBRID__SERVICEBUS__CONNECTION_STRING) or \
         servicebus.namespace (HYBRID__SERVICEBUS__NAMESPACE)"
    )]
    NothingConfigured,
    #[error("servicebus.credential: {0}")]
    Credential(String),
    #[error("cannot start the embedded Service Bus emulator: {0}")]
    EmulatorStart(String),
}

/// Where the configuration points.
#[derive(Debug)]
pub enum Target {
    ConnectionString(ConnectionString),
    Namespace(String),
    /// Nothing configured: the embedded emulator.
    Embedded,
}

impl Target {
    pub fn of(settings: &Settings) -> Result<Target, TargetError> {
        let sb = &settings.servicebus;
        if !sb.connection_string.is_empty() {
            let cs = ConnectionString::parse(&sb.connection_string)
                .map_err(|e| TargetError::ConnectionString(e.to_string()))?;
            return Ok(Target::ConnectionString(cs));
        }
        if !sb.namespace.is_empty() {
            return Ok(Target::Namespace(sb.namespace.clone()));
        }
        if sb.embedded == EmbeddedEmulator::Never {
            return Err(TargetError::NothingConfigured);
        }
        Ok(Target::Embedded)
    }
}

/// The connection string of the embedded emulator listening on `listen` with `key`
/// (`emulator.key`) for the official emulator's rule name.
pub fn emulator_connection_string(listen: &str, key: &str) -> String {
    crate::emulator::connection_string(listen, crate::emulator::sas::DEFAULT_KEY_NAME, key)
}

/// A client for `entity` (the queue it receives from and settles on) at `target`; for the
/// embedded target, the emulator must be listening (started by `run`).
pub fn client(
    settings: &Settings,
    target: &Target,
    entity: &str,
) -> Result<ServiceBusBroker, TargetError> {
    let lifetime = Duration::from_secs(settings.servicebus.token_lifetime_s);
    let config = match target {
        Target::ConnectionString(cs) => {
            ServiceBusConfig::from_connection_string(cs, entity, lifetime)
        }
        Target::Namespace(ns) => {
            let credential = entra_credential(settings.servicebus.credential)
                .map_err(|e| TargetError::Credential(e.to_string()))?;
            ServiceBusConfig::for_namespace(ns, Credential::Entra(credential), entity)
        }
        Target::Embedded => {
            let cs = ConnectionString::parse(&emulator_connection_string(
                &settings.emulator.listen,
                &settings.emulator.key,
            ))
            .map_err(|e| TargetError::ConnectionString(e.to_string()))?;
            ServiceBusConfig::from_connection_string(&cs, entity, lifetime)
        }
    };
    Ok(ServiceBusBroker::new(config))
}

/// Starts the embedded emulator in this process, as configured.
pub async fn start_emulator(settings: &Settings) -> Result<EmulatorHandle, TargetError> {
    let args = crate::emulator::cli::EmulatorArgs {
        listen: None,
        entities: None,
        data: None,
        in_memory: false,
    };
    let config = crate::emulator::cli::config(&settings.emulator, &args)
        .map_err(|e| TargetError::EmulatorStart(format!("{e:#}")))?;
    crate::emulator::Emulator::start(config).await.map_err(|e| {
        let hint = match &e {
            crate::emulator::StartError::Bind { source, .. } => format!(
                ": {source} (another `hybrid-worker run` or emulator may hold it; set HYBRID__EMULATOR__LISTEN, or configure HYBRID__SERVICEBUS__CONNECTION_STRING)"
            ),
            crate::emulator::StartError::Broker(_) => format!(
                " (its store is in {})",
                settings.emulator.data_dir.display()
            ),
        };
        TargetError::EmulatorStart(format!("{e}{hint}"))
    })
}
