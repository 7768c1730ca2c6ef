//! Session mode (`queues.jobs_sessions`, `docs/sessions.md`): jobs that share a SessionId run
//! one at a time, in the order they were sent, while different sessions run side by side.
//!
//! The engine accepts up to `engine.concurrency` sessions at once, each holding a slot for as
//! long as it holds the session. A session's task takes its next message only after the
//! previous one was settled, keeps the session lock renewed while it holds it, and lets the
//! session go after `queues.session_idle_timeout_s` without a message, on shutdown, or when its
//! lock is lost.
//!
//! A retryable failure is retried in place: the session is kept, the backoff waited out and
//! the job run again from the same delivery. The plain-queue route (a scheduled copy, then
//! complete) would put the copy behind later messages of the same session and reorder it.
//! A job dead-lettered (or completed) frees its session's next message at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use super::settle::{JobEnd, Settled};
use super::{Engine, EngineStats, JobTask};
use crate::broker::session::SessionReceiver;
use crate::broker::{Broker, BrokerError, Delivery, OutgoingMessage};
use crate::job::Envelope;
use crate::telemetry::http::readiness;
use crate::telemetry::metrics::{WorkerLabel, metrics};

use super::retry::delay_before;

/// What session mode needs besides [`EngineOptions`](super::EngineOptions).
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// A held session with no message for this long is let go.
    pub idle_timeout: Duration,
}

/// What a job of a session knows about its session.
#[derive(Debug, Clone)]
pub(super) struct InSession {
    /// The engine's stop signal: a backoff in progress ends at once (the message is abandoned
    /// and delivered again, in order).
    shutdown: CancellationToken,
    lock: Arc<SessionLock>,
}

/// The session lock as its keeper last saw it.
#[derive(Debug)]
struct SessionLock {
    until: std::sync::Mutex<Instant>,
    /// Cancelled when the lock is gone.
    lost: CancellationToken,
}

impl SessionLock {
    fn until(&self) -> Instant {
        *self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_until(&self, until: Instant) {
        *self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = until;
    }
}

impl Engine {
    /// Receives sessions in place of messages: each slot holds one session.
    pub fn with_sessions(mut self, options: SessionOptions) -> Self {
        self.sessions = Some(options);
        self
    }

    /// [`run`](Self::run) for a jobs queue that requires sessions.
    pub(super) async fn run_sessions(
        &self,
        shutdown: CancellationToken,
        options: &SessionOptions,
    ) -> EngineStats {
        let slots = self.open_slots("The engine is receiving jobs from sessions.");
        let tracker = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        let received = Arc::new(AtomicU64::new(0));
        let mut failures = 0u32;
        loop {
            let Some(permit) = self.free_slot(&slots, &shutdown).await else {
                break;
            };
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                r = self.broker.accept_session(self.options.receive_wait) => r,
            };
            if accepted.is_ok() {
                failures = 0;
                readiness().broker_up.store(true, Ordering::SeqCst);
            }
            match accepted {
                Ok(None) => {}
                Ok(Some(session)) => {
                    let task = SessionTask {
                        engine_broker: self.broker.clone(),
                        job: JobTask {
                            broker: self.broker.clone(),
                            executor: self.executor.clone(),
                            options: self.options.clone(),
                            hard_stop: hard_stop.clone(),
                            faults: self.faults.clone(),
                            session: None,
                        },
                        idle_timeout: options.idle_timeout,
                        shutdown: shutdown.clone(),
                        received: received.clone(),
                    };
                    tracker.spawn(task.run(Arc::from(session), permit));
                }
                Err(e) => {
                    if !super::back_off(&mut failures, &e, "Accepting a session failed.", &shutdown)
                        .await
                    {
                        break;
                    }
                }
            }
        }
        readiness().draining.store(true, Ordering::SeqCst);
        self.drain(&tracker, &hard_stop).await;
        EngineStats {
            received: received.load(Ordering::SeqCst),
        }
    }
}

/// One accepted session, from its first message to its release.
struct SessionTask {
    engine_broker: Arc<dyn Broker>,
    /// A template: its broker and session are set per session.
    job: JobTask,
    idle_timeout: Duration,
    shutdown: CancellationToken,
    received: Arc<AtomicU64>,
}

impl SessionTask {
    async fn run(mut self, session: Arc<dyn SessionReceiver>, _slot: OwnedSemaphorePermit) {
        let span = tracing::info_span!("session", session_id = %session.session_id());
        async move {
            // fe2o3 does not keep the accepting attach's `com.microsoft:locked-until-utc`:
            // renewing at once both learns the expiry and confirms the lock.
            let until = match session.renew().await {
                Ok(until) => until,
                Err(e) => {
                    tracing::warn!(error = %e, "The accepted session could not be renewed; letting it go.");
                    session.close().await;
                    return;
                }
            };
            tracing::info!("Accepted a session.");
            let lock = Arc::new(SessionLock {
                until: std::sync::Mutex::new(until),
                lost: CancellationToken::new(),
            });
            let done = CancellationToken::new();
            // A job stops when its session lock is lost (another holder may already run the
            // session's next job), or at the engine's hard stop.
            self.job.hard_stop = self.job.hard_stop.child_token();
            let stop_jobs = self.job.hard_stop.clone();
            let keeper = tokio::spawn(
                keep_session(session.clone(), lock.clone(), done.clone(), stop_jobs)
                    .in_current_span(),
            );
            self.job.broker = Arc::new(SessionBroker {
                inner: self.engine_broker.clone(),
                session: session.clone(),
                lock: lock.clone(),
            });
            self.job.session = Some(InSession {
                shutdown: self.shutdown.clone(),
                lock: lock.clone(),
            });
            let why = self.jobs(session.as_ref(), &lock).await;
            done.cancel();
            let _ = keeper.await;
            session.close().await;
            tracing::info!(reason = why, "Let the session go.");
        }
        .instrument(span)
        .await;
    }

    /// Runs the session's jobs one after another; returns why it stopped.
    async fn jobs(&self, session: &dyn SessionReceiver, lock: &SessionLock) -> &'static str {
        loop {
            // Biased: after a job that ran through the stop signal, the stop wins over a
            // message that is already there.
            let next = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return "shutdown",
                () = lock.lost.cancelled() => return "lock lost",
                next = session.receive(self.idle_timeout) => next,
            };
            let delivery = match next {
                Ok(Some(delivery)) => delivery,
                Ok(None) => return "idle",
                Err(BrokerError::LockLost) => return "lock lost",
                Err(e) => {
                    tracing::warn!(error = %e, "Receiving from the session failed.");
                    return "receive failed";
                }
            };
            self.received.fetch_add(1, Ordering::SeqCst);
            match self.job.handle(delivery).await {
                Ok(
                    Settled::Replied | Settled::DeadLettered { .. } | Settled::ReplyUndeliverable,
                ) => {}
                // Delivered again at the head of the session: to whoever takes it next, after
                // the fault pause or the lock's end.
                Ok(Settled::AbandonedAfterDaemonFault) => return "daemon fault",
                Ok(Settled::LeftToExpire) => return "lock lost",
                Ok(Settled::Abandoned) => return "job interrupted",
                Ok(Settled::RetryScheduled { .. }) => {
                    tracing::error!(
                        "A session's job was retried by a scheduled copy; this is a bug."
                    );
                    return "retry scheduled";
                }
                Err(_) => return "settlement failed",
            }
        }
    }
}

impl JobTask {
    /// [`outcome`](Self::outcome), retried in place while the failure is retryable and attempts
    /// are left: `envelope.attempt` counts the attempts, and the reply names the last.
    pub(super) async fn outcome_in_session(
        &self,
        session: &InSession,
        delivery: &Delivery,
        envelope: &mut Envelope,
    ) -> JobEnd {
        loop {
            let outcome = self.outcome(delivery, envelope).await;
            let JobEnd::Failed {
                worker: Some(worker),
                error,
                policy: Some(policy),
                ..
            } = &outcome
            else {
                return outcome;
            };
            if !error.retryable || envelope.attempt >= policy.max_attempts {
                return outcome;
            }
            let next = envelope.attempt + 1;
            let delay = delay_before(&policy.retry, next);
            tracing::info!(next_attempt = next, delay_ms = delay.as_millis() as u64, kind = %error.kind, "The job failed; retrying in place, keeping its session.");
            metrics()
                .retries_scheduled
                .get_or_create(&WorkerLabel {
                    worker: worker.clone(),
                })
                .inc();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = session.shutdown.cancelled() => return JobEnd::Interrupted,
                () = self.hard_stop.cancelled() => return JobEnd::Interrupted,
                () = session.lock.lost.cancelled() => return JobEnd::LockLost,
            }
            envelope.attempt = next;
        }
    }
}

/// Renews the session lock at half its remaining time until `done`; cancels `lock.lost` and
/// `stop_jobs` when it is gone, or when it runs out before a renewal is answered. Transient
/// errors are retried every second while the lock lasts.
async fn keep_session(
    session: Arc<dyn SessionReceiver>,
    lock: Arc<SessionLock>,
    done: CancellationToken,
    stop_jobs: CancellationToken,
) {
    loop {
        let until = lock.until();
        let renew_at = Instant::now()
            + super::lock::renew_after(until.saturating_duration_since(Instant::now()));
        tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep_until(renew_at) => {}
        }
        // A renewal still unanswered when the lock runs out cannot save it: the job stops
        // then, not when the request finally fails.
        let renewed = tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep_until(until) => Err(BrokerError::LockLost),
            r = session.renew() => r,
        };
        match renewed {
            Ok(until) => {
                metrics().lock_renewals.inc();
                lock.set_until(until);
            }
            Err(e) if e.is_transient() && Instant::now() + Duration::from_secs(1) < until => {
                tracing::warn!(error = %e, "Renewing the session lock failed; trying again.");
                tokio::select! {
                    () = done.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "The session lock was lost.");
                metrics().lock_losses.inc();
                lock.lost.cancel();
                stop_jobs.cancel();
                return;
            }
        }
    }
}

/// The engine's [`Broker`] for the jobs of one session: settlement goes to the session, a
/// job's lock is the session lock (kept by [`keep_session`]), sends go to the engine's broker.
struct SessionBroker {
    inner: Arc<dyn Broker>,
    session: Arc<dyn SessionReceiver>,
    lock: Arc<SessionLock>,
}

#[async_trait]
impl Broker for SessionBroker {
    async fn receive(&self, _max: usize, _wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        Err(BrokerError::Refused(
            "a session's jobs are received from the session".into(),
        ))
    }

    async fn complete(&self, lock_token: Uuid) -> Result<(), BrokerError> {
        self.session.complete(lock_token).await
    }

    async fn abandon(&self, lock_token: Uuid) -> Result<(), BrokerError> {
        self.session.abandon(lock_token).await
    }

    async fn dead_letter_keeping(
        &self,
        lock_token: Uuid,
        reason: &str,
        description: &str,
        keep: &BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        self.session
            .dead_letter_keeping(lock_token, reason, description, keep)
            .await
    }

    /// The session lock's expiry as its keeper last renewed it: a message of a session is
    /// covered by the session lock.
    async fn renew_lock(&self, _lock_token: Uuid) -> Result<Instant, BrokerError> {
        let until = self.lock.until();
        if self.lock.lost.is_cancelled() || until <= Instant::now() {
            return Err(BrokerError::LockLost);
        }
        Ok(until)
    }

    /// Refused once the session lock is lost: the session's next holder runs the job again and
    /// replies in order; a late reply from here could overtake its later jobs' replies.
    /// A lock that ran out before its keeper could renew it counts as lost too.
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), BrokerError> {
        if self.lock.lost.is_cancelled() || self.lock.until() <= Instant::now() {
            return Err(BrokerError::LockLost);
        }
        self.inner.send(queue, message).await
    }

    async fn schedule(
        &self,
        queue: &str,
        message: OutgoingMessage,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        self.inner.schedule(queue, message, delay).await
    }
}
