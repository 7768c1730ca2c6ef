//! `hybrid-worker run`: the daemon. Checks (or builds) every worker's venv, connects to
//! Service Bus — or starts the embedded emulator when none is configured and
//! `servicebus.embedded` allows it — and runs the engine until SIGTERM/SIGINT, then drains.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use super::{UsageError, build_command, scan};
use crate::broker::BrokerError;
use crate::config::Settings;
use crate::emulator::EmulatorHandle;
use crate::engine::executor::{ProcessExecutor, ReadyWorker};
use crate::engine::sessions::SessionOptions;
use crate::engine::settle::Queues;
use crate::engine::{Engine, EngineOptions};
use crate::servicebus::client::ServiceBusBroker;
use crate::servicebus::connection_string::ConnectionString;
use crate::servicebus::target::{Target, client, start_emulator};
use crate::worker::Catalog;
use crate::worker::venv::{VenvPlan, VenvState};

pub async fn run(settings: &Settings) -> anyhow::Result<ExitCode> {
    // First: where jobs come from. A deployment with `servicebus.embedded = "never"` and no
    // Service Bus configured stops here (exit 2), before it could report ready.
    let target = Target::of(settings)?;
    let open_files = crate::runner::child::raise_descriptor_limit(settings.engine.concurrency)
        .map_err(|e| UsageError(e.to_string()))?;
    tracing::info!(open_files, "The daemon's open-files limit.");
    let shutdown = crate::shutdown::on_signals()?;
    // Probes and metrics answer from the start: not ready until workers and broker are.
    let http_stop = CancellationToken::new();
    let http_addr = crate::telemetry::http::serve(&settings.http.listen, http_stop.clone())
        .await
        .map_err(|e| {
            UsageError(format!(
                "cannot listen on http.listen = {}: {e}",
                settings.http.listen
            ))
        })?;
    tracing::info!(addr = %http_addr, "Serving /metrics, /healthz and /readyz.");
    let dir = settings.workers.dir.clone();
    let catalog = scan(settings, &dir)?;
    if let Some(broken) = catalog.broken.first() {
        return Err(UsageError(format!("a worker cannot be loaded: {broken}")).into());
    }
    let ready = ready_workers(settings, &catalog)?;
    if ready.is_empty() {
        return Err(UsageError(format!("no workers to run in {}", dir.display())).into());
    }
    let names: Vec<&str> = ready.iter().map(|r| r.worker.name.as_str()).collect();
    tracing::info!(workers = ?names, "Workers verified.");
    let ready_state = crate::telemetry::http::readiness();
    ready_state.workers_verified.store(true, Ordering::SeqCst);
    // Before any job, warm parent or emulator thread: the daemon may move itself into a leaf
    // cgroup, and removes the job cgroups a crashed daemon left.
    let runner = super::runner_for(settings, &ready)?;
    let storage = super::storage(settings)?;
    if let Some(storage) = &storage {
        // Results have somewhere to go from the first job (a no-op when it exists).
        let results = &settings.storage.results_container;
        if let Err(e) = storage.ensure_container(results).await {
            tracing::warn!(container = %results, error = %e, "Could not make sure the results container exists; uploads will fail until it does.");
        }
    }
    let executor = Arc::new(ProcessExecutor::new(ready, &catalog, runner).with_storage(storage));

    let (broker, embedded) = connect(settings, &target).await?;
    let engine = Engine::new(broker.clone(), executor, engine_options(settings));
    let engine = if settings.queues.jobs_sessions {
        engine.with_sessions(SessionOptions {
            idle_timeout: settings.queues.session_idle_timeout(),
        })
    } else {
        engine
    };
    let stats = engine.run(shutdown).await;
    broker.close().await;
    if let Some(handle) = embedded {
        handle.shutdown().await;
    }
    http_stop.cancel();
    tracing::info!(received = stats.received, "The daemon has stopped.");
    Ok(ExitCode::SUCCESS)
}

/// The allowed workers with a verified venv. Missing venvs are built first when
/// `engine.build_venvs_on_start` is on; otherwise the daemon refuses to start and names the
/// command that builds them.
fn ready_workers(settings: &Settings, catalog: &Catalog) -> anyhow::Result<Vec<ReadyWorker>> {
    let mut interpreters = super::Interpreters::new(settings);
    let allow = &settings.workers.allow;
    for name in allow {
        if !catalog.workers.contains_key(name) {
            return Err(UsageError(format!(
                "workers.allow names {name:?}, which is not in {}",
                catalog.dir.display()
            ))
            .into());
        }
    }
    let mut ready = Vec::new();
    for worker in catalog.workers.values() {
        if !allow.is_empty() && !allow.contains(&worker.name) {
            tracing::info!(worker = %worker.name, "Worker not in workers.allow: its jobs will be refused with PolicyDenied.");
            continue;
        }
        let python = interpreters.for_worker(worker)?;
        let plan = VenvPlan::new(worker, &python, &settings.workers.venv_root())?;
        if !plan.state().is_ready() {
            if !settings.engine.build_venvs_on_start {
                return Err(UsageError(format!(
                    "the venv of worker {:?} is missing or stale; run `{}`",
                    worker.name,
                    build_command(&worker.name, &catalog.dir)
                ))
                .into());
            }
            tracing::info!(worker = %worker.name, venv = %plan.dir.display(), "Building the worker's venv before receiving jobs.");
            let started = std::time::Instant::now();
            plan.build(
                &python,
                &|step| tracing::info!(worker = %worker.name, "{step}"),
            )?;
            tracing::info!(worker = %worker.name, seconds = started.elapsed().as_secs_f64(), "Built the worker's venv.");
        }
        match plan.state() {
            VenvState::Ready { python, .. } => ready.push(ReadyWorker {
                worker: worker.clone(),
                python,
            }),
            VenvState::Missing { expected, .. } => {
                return Err(UsageError(format!(
                    "the venv of worker {:?} at {} is not usable after building",
                    worker.name,
                    expected.display()
                ))
                .into());
            }
        }
    }
    Ok(ready)
}

/// The client of the configured Service Bus (the embedded emulator started first when nothing
/// is configured), connected; a refusal or a missing queue is the operator's to fix (exit 2),
/// an unreachable broker is retried with backoff by the engine.
async fn connect(
    settings: &Settings,
    target: &Target,
) -> anyhow::Result<(Arc<ServiceBusBroker>, Option<EmulatorHandle>)> {
    let mut embedded = None;
    let broker = match target {
        Target::Embedded => {
            let handle = start_emulator(settings).await?;
            let cs = handle.connection_string();
            tracing::info!(
                connection_string = %cs,
                jobs = %settings.queues.jobs,
                results = %settings.queues.results,
                "No Service Bus is configured: running on the embedded emulator. Producers connect with this connection string."
            );
            let parsed = ConnectionString::parse(&cs).map_err(|e| anyhow::anyhow!(e))?;
            let broker = client(
                settings,
                &Target::ConnectionString(parsed),
                &settings.queues.jobs,
            )?;
            embedded = Some(handle);
            broker
        }
        other => client(settings, other, &settings.queues.jobs)?,
    };
    let broker = Arc::new(broker);
    let ready_state = crate::telemetry::http::readiness();
    match broker.connect().await {
        Ok(()) => {
            ready_state.broker_up.store(true, Ordering::SeqCst);
            tracing::info!(queue = %settings.queues.jobs, "Connected; receiving jobs.");
        }
        Err(BrokerError::Refused(why)) => {
            return Err(UsageError(format!("Service Bus refused the connection: {why}")).into());
        }
        Err(BrokerError::NotFound(entity)) => {
            return Err(UsageError(format!(
                "Service Bus has no entity {entity:?} (queues.jobs = {:?}); create it, or name the right queue",
                settings.queues.jobs
            ))
            .into());
        }
        Err(e) => {
            tracing::warn!(error = %e, "Service Bus is not reachable yet; retrying with backoff.")
        }
    }
    Ok((broker, embedded))
}

fn engine_options(settings: &Settings) -> EngineOptions {
    EngineOptions {
        concurrency: settings.engine.concurrency,
        queues: Queues {
            jobs: settings.queues.jobs.clone(),
            results: settings.queues.results.clone(),
            reply_allowed: settings.queues.reply_allowed.clone(),
        },
        drain_timeout: settings.engine.drain_timeout(),
        max_lock_renewal: settings.engine.max_lock_renewal(),
        max_body_bytes: settings.engine.max_body_kb * 1024,
        receive_wait: settings.engine.receive_wait(),
    }
}
