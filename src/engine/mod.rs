//! The engine: receive jobs with credit equal to free slots, run each with its lock kept, and
//! settle each outcome in one place; on shutdown, stop receiving, drain, then stop what is left
//! and abandon it.

pub mod claim;
pub mod executor;
pub mod faults;
pub mod lock;
pub mod retry;
pub mod sessions;
pub mod settle;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use std::sync::atomic::Ordering;

use crate::broker::{Broker, BrokerError, Delivery};
use crate::job::{Envelope, Job};
use crate::runner::{RunOutcome, RunReport};
use crate::telemetry::http::readiness;
use crate::telemetry::metrics::{ReasonLabel, WorkerLabel, metrics};
use executor::Executor;
use faults::Faults;
use lock::{LockEnd, keep_lock};
use settle::{JobEnd, Queues, Settled, settle};

/// What the engine needs to know, taken from the configuration.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub concurrency: usize,
    pub queues: Queues,
    /// How long running jobs may go on after a stop signal.
    pub drain_timeout: Duration,
    pub max_lock_renewal: Duration,
    pub max_body_bytes: usize,
    pub receive_wait: Duration,
}

/// Counts of what the engine did, for its caller and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EngineStats {
    pub received: u64,
}

/// Runs jobs from a broker until `shutdown` is cancelled, then drains.
pub struct Engine {
    broker: Arc<dyn Broker>,
    executor: Arc<dyn Executor>,
    options: EngineOptions,
    /// The daemon's own faults, which pause receiving while they go on.
    faults: Arc<Faults>,
    /// Set when the jobs queue requires sessions ([`sessions`]).
    sessions: Option<sessions::SessionOptions>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub fn new(
        broker: Arc<dyn Broker>,
        executor: Arc<dyn Executor>,
        options: EngineOptions,
    ) -> Self {
        Self {
            broker,
            executor,
            options,
            faults: Arc::default(),
            sessions: None,
        }
    }

    /// The slots of `engine.concurrency` jobs (or sessions), all free, as the metric says; logs
    /// `started`.
    fn open_slots(&self, started: &'static str) -> Arc<Semaphore> {
        metrics()
            .free_slots
            .set(i64::try_from(self.options.concurrency).unwrap_or(i64::MAX));
        tracing::info!(concurrency = self.options.concurrency, queue = %self.options.queues.jobs, "{started}");
        Arc::new(Semaphore::new(self.options.concurrency))
    }

    /// The receive loop. Returns once `shutdown` was cancelled and every job ended: within the
    /// drain timeout on its own, or stopped and abandoned after it.
    pub async fn run(&self, shutdown: CancellationToken) -> EngineStats {
        if let Some(options) = &self.sessions {
            return self.run_sessions(shutdown, options).await;
        }
        let slots = self.open_slots("The engine is receiving jobs.");
        let tracker = TaskTracker::new();
        // Cancelled when the drain timeout runs out: every running job is then stopped.
        let hard_stop = CancellationToken::new();
        let mut stats = EngineStats::default();
        let mut failures = 0u32;
        loop {
            let Some(first) = self.free_slot(&slots, &shutdown).await else {
                break;
            };
            let mut permits = vec![first];
            while let Ok(p) = slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            let received = tokio::select! {
                () = shutdown.cancelled() => break,
                r = self.broker.receive(permits.len(), self.options.receive_wait) => r,
            };
            let ready = readiness();
            match received {
                Ok(deliveries) => {
                    ready.broker_up.store(true, Ordering::SeqCst);
                    failures = 0;
                    for delivery in deliveries {
                        let Some(permit) = permits.pop() else {
                            // A broker that ignores `max`: the message is released by its lock.
                            tracing::error!(
                                "The broker delivered more messages than were asked for."
                            );
                            break;
                        };
                        stats.received += 1;
                        let job = JobTask {
                            broker: self.broker.clone(),
                            executor: self.executor.clone(),
                            options: self.options.clone(),
                            hard_stop: hard_stop.clone(),
                            faults: self.faults.clone(),
                            session: None,
                        };
                        tracker.spawn(async move {
                            // Logged and counted by `handle`; the broker redelivers on failure.
                            let _settled = job.handle(delivery).await;
                            drop(permit);
                        });
                    }
                }
                Err(e) => {
                    if !back_off(&mut failures, &e, "Receiving jobs failed.", &shutdown).await {
                        break;
                    }
                }
            }
        }
        readiness().draining.store(true, Ordering::SeqCst);
        self.broker.stop_receiving().await;
        self.drain(&tracker, &hard_stop).await;
        stats
    }

    /// Waits for the running tasks to end, within the drain timeout; then stops the rest.
    async fn drain(&self, tracker: &TaskTracker, hard_stop: &CancellationToken) {
        tracker.close();
        let running = tracker.len();
        if running > 0 {
            tracing::info!(
                running,
                drain_timeout_s = self.options.drain_timeout.as_secs(),
                "Stopped receiving; waiting for running jobs to finish."
            );
        }
        if tokio::time::timeout(self.options.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = tracker.len(),
                "The drain timeout ran out; stopping the remaining jobs and abandoning their messages."
            );
            hard_stop.cancel();
            tracker.wait().await;
        }
        tracing::info!("The engine has stopped.");
    }
}

/// One received message on its way to a settled outcome.
struct JobTask {
    broker: Arc<dyn Broker>,
    executor: Arc<dyn Executor>,
    options: EngineOptions,
    hard_stop: CancellationToken,
    faults: Arc<Faults>,
    /// Set for a job of a session: retried in place ([`sessions`]).
    session: Option<sessions::InSession>,
}

impl JobTask {
    /// Runs and settles one message; returns what settlement did.
    async fn handle(&self, delivery: Delivery) -> Result<Settled, BrokerError> {
        let mut envelope = Envelope::from_properties(&delivery.properties);
        let span = tracing::info_span!(
            "job",
            job_id = %envelope.job_id,
            correlation_id = tracing::field::Empty,
            worker = tracing::field::Empty,
            attempt = envelope.attempt,
            flow_run_id = tracing::field::Empty,
            traceparent = tracing::field::Empty,
        );
        // Optional ids appear in the log only when the message carries them.
        for (field, value) in [
            ("correlation_id", &envelope.correlation_id),
            ("flow_run_id", &envelope.flow_run_id),
            ("traceparent", &envelope.traceparent),
        ] {
            if let Some(value) = value {
                span.record(field, value.as_str());
            }
        }
        async move {
            let m = metrics();
            let concurrency = i64::try_from(self.options.concurrency).unwrap_or(i64::MAX);
            let running = m.in_flight.inc() + 1;
            m.free_slots.set(concurrency - running);
            let outcome = match &self.session {
                Some(session) => self.outcome_in_session(session, &delivery, &mut envelope).await,
                None => self.outcome(&delivery, &envelope).await,
            };
            // Only workers this daemon knows become label values: a body naming random workers
            // must not grow the metrics without bound.
            let label = match &outcome {
                JobEnd::Succeeded { worker, .. } | JobEnd::DaemonFault { worker } => worker.clone(),
                JobEnd::Failed { worker: Some(worker), policy: Some(_), .. } => worker.clone(),
                _ => "unknown".to_owned(),
            };
            if let JobEnd::Succeeded { duration, .. } | JobEnd::Failed { duration, policy: Some(_), .. } = &outcome {
                m.observe_duration(&label, *duration);
            }
            let result = settle(
                self.broker.as_ref(),
                &self.options.queues,
                &delivery,
                &envelope,
                outcome,
            )
            .await;
            match &result {
                Ok(Settled::Replied) => tracing::info!("The job succeeded; reply sent and message completed."),
                Ok(Settled::RetryScheduled { attempt, delay }) => tracing::info!(next_attempt = attempt, delay_ms = delay.as_millis() as u64, "The job failed and will be retried."),
                Ok(Settled::DeadLettered { reason }) => tracing::warn!(reason = %reason, "The job failed; reply sent and message dead-lettered."),
                Ok(Settled::Abandoned) => tracing::info!("The job was interrupted; its message was abandoned for redelivery."),
                Ok(Settled::AbandonedAfterDaemonFault) => tracing::warn!("The daemon could not start the job (its own fault, not the job's); the message was abandoned to run again."),
                Ok(Settled::LeftToExpire) => tracing::warn!("The job's lock was lost; it was stopped and will be delivered again."),
                Ok(Settled::ReplyUndeliverable) => tracing::warn!("The job ran but its reply could not be sent; message dead-lettered with the result."),
                Err(e) => tracing::warn!(error = %e, "Settling the job failed; the message will be delivered again."),
            }
            let ended = match &result {
                Ok(Settled::Replied) => "succeeded",
                Ok(Settled::RetryScheduled { .. }) => {
                    m.retries_scheduled.get_or_create(&WorkerLabel { worker: label.clone() }).inc();
                    "retried"
                }
                Ok(Settled::DeadLettered { reason }) => {
                    m.dead_letters.get_or_create(&ReasonLabel { reason: reason.as_str().to_owned() }).inc();
                    "dead_lettered"
                }
                Ok(Settled::ReplyUndeliverable) => {
                    m.dead_letters.get_or_create(&ReasonLabel { reason: settle::REPLY_UNDELIVERABLE.to_owned() }).inc();
                    "dead_lettered"
                }
                Ok(Settled::Abandoned) => "abandoned",
                Ok(Settled::AbandonedAfterDaemonFault) => "daemon_fault",
                Ok(Settled::LeftToExpire) => "lock_lost",
                Err(_) => "settle_failed",
            };
            m.job_ended(&label, ended);
            let running = m.in_flight.dec() - 1;
            m.free_slots.set(concurrency - running);
            result
        }
        .instrument(span)
        .await
    }

    /// Parses, checks and runs the job, with its lock kept while it runs.
    async fn outcome(&self, delivery: &Delivery, envelope: &Envelope) -> JobEnd {
        // Checked first: a job that asks for a reply where none may go never runs.
        if let Err(error) = settle::reply_queue(&self.options.queues, envelope) {
            return JobEnd::refused(None, error);
        }
        let job = match Job::parse(
            envelope.clone(),
            &delivery.body,
            self.options.max_body_bytes,
        ) {
            Ok(job) => job,
            Err(error) => return JobEnd::refused(None, error),
        };
        tracing::Span::current().record("worker", job.worker.as_str());
        let policy = match self.executor.policy(&job) {
            Ok(policy) => policy,
            Err(error) => return JobEnd::refused(Some(job.worker), error),
        };
        tracing::info!("The job started.");
        if let Some(waited) = delivery
            .enqueued_at
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        {
            metrics().observe_queue_wait(&job.worker, waited);
        }
        let Some(execution) = self.run_locked(delivery, &job).await else {
            // Another delivery will run the job; nothing may be settled from this one.
            return JobEnd::LockLost;
        };
        if let RunOutcome::DaemonFault(fault) = &execution.outcome {
            tracing::error!(stage = fault.stage.as_str(), error = %fault, "The daemon failed the job through its own fault.");
            self.faults.record(fault.stage);
            return JobEnd::DaemonFault { worker: job.worker };
        }
        self.faults.clear();
        match execution.outcome {
            RunOutcome::DaemonFault(_) | RunOutcome::Stopped => JobEnd::Interrupted,
            RunOutcome::Succeeded(output) => JobEnd::Succeeded {
                worker: job.worker,
                output,
                duration: execution.duration,
                resources: execution.resources,
                blobs: execution.blobs,
            },
            RunOutcome::Failed(error) => JobEnd::Failed {
                worker: Some(job.worker),
                error,
                policy: Some(policy),
                duration: execution.duration,
                resources: execution.resources,
            },
        }
    }

    /// Runs the job while its lock is renewed; `None` when the lock was lost (the job is
    /// stopped then). Past the renewal ceiling the job runs on, and its settlement may find
    /// the lock gone.
    async fn run_locked(&self, delivery: &Delivery, job: &Job) -> Option<RunReport> {
        let stop = self.hard_stop.child_token();
        let job_ended = CancellationToken::new();
        let mut keeper = tokio::spawn(
            keep_lock(
                self.broker.clone(),
                delivery.lock_token,
                delivery.locked_until,
                self.options.max_lock_renewal,
                job_ended.clone(),
            )
            .in_current_span(),
        );
        let mut run = Box::pin(self.executor.execute(job, stop.clone()));
        let mut keeper_done = false;
        let mut lock_lost = false;
        let execution = loop {
            tokio::select! {
                execution = &mut run => break execution,
                end = &mut keeper, if !keeper_done => {
                    keeper_done = true;
                    if matches!(end, Ok(LockEnd::Lost)) {
                        lock_lost = true;
                        stop.cancel();
                    }
                }
            }
        };
        drop(run);
        job_ended.cancel();
        keeper.abort();
        (!lock_lost).then_some(execution)
    }
}

impl Engine {
    /// Waits for a free job slot, then, while the daemon's own faults last, for their pause:
    /// each message taken then would only be abandoned (and its delivery count raised), so it
    /// is left to other replicas. `None` when shutdown came first.
    async fn free_slot(
        &self,
        slots: &Arc<Semaphore>,
        shutdown: &CancellationToken,
    ) -> Option<OwnedSemaphorePermit> {
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            permit = slots.clone().acquire_owned() => permit.ok()?,
        };
        if let Some(pause) = self.faults.pause() {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(pause) => {}
            }
        }
        Some(permit)
    }
}

/// After a failed receive or session accept: the broker counts as down (`/readyz`) and the
/// loop waits 200 ms × 2^failures, up to 12.8 s. `false` when shutdown came first.
async fn back_off(
    failures: &mut u32,
    error: &(dyn std::fmt::Display + Sync),
    what: &str,
    shutdown: &CancellationToken,
) -> bool {
    readiness().broker_up.store(false, Ordering::SeqCst);
    *failures += 1;
    let pause = Duration::from_millis(200 * 2u64.pow((*failures).min(6)));
    tracing::warn!(error = %error, retry_in_ms = pause.as_millis() as u64, "{what}");
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(pause) => true,
    }
}
