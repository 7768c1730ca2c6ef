//! The daemon's metrics, in Prometheus text form on `/metrics`.
//!
//! One process-wide set, like the process itself: the engine, the Service Bus client and the
//! runner record into it without a handle being threaded through every call. Labels are few
//! and bounded (worker, outcome, reason, isolation mode — never a job id).

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerOutcome {
    pub worker: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerDecision {
    pub worker: String,
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerDirection {
    pub worker: String,
    pub direction: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 1 ms to ~9 minutes.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

fn start_histogram() -> Histogram {
    // 0.5 ms to ~4 s: process starts.
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Jobs that ended, by worker and how: succeeded, failed, retried, dead_lettered, abandoned,
    /// lock_lost, settle_failed.
    pub jobs: Family<WorkerOutcome, Counter>,
    pub job_duration: HistogramFamily<WorkerLabel>,
    /// From the broker's enqueue time to the job's start.
    pub queue_wait: HistogramFamily<WorkerLabel>,
    pub in_flight: Gauge,
    pub free_slots: Gauge,
    pub lock_renewals: Counter,
    pub lock_losses: Counter,
    pub retries_scheduled: Family<WorkerLabel, Counter>,
    pub dead_letters: Family<ReasonLabel, Counter>,
    /// Connections opened to Service Bus (the first one included).
    pub broker_connects: Counter,
    /// Time to start a job's process (fork + exec, or a fork from a warm parent).
    pub process_start: HistogramFamily<ModeLabel>,
    /// Jobs the daemon could not start through its own fault, by stage (cgroup, temp_folder,
    /// sandbox, start, warm_parent); each such job was abandoned, not blamed.
    pub daemon_faults: Family<StageLabel, Counter>,
    /// Connections to the egress proxy, by worker and decision (`docs/egress.md`).
    pub egress_connections: Family<WorkerDecision, Counter>,
    /// Bytes relayed by the egress proxy, by worker and direction (`out`: job to destination).
    pub egress_bytes: Family<WorkerDirection, Counter>,
    /// Entra ID tokens handed to jobs (docs/secrets.md), by worker (cache hits included).
    pub tokens_issued: Family<WorkerLabel, Counter>,
    /// Token requests of jobs refused (a scope their worker does not declare), by worker.
    pub tokens_denied: Family<WorkerLabel, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hybrid");
        let m = Metrics {
            jobs: Family::default(),
            job_duration: Family::new_with_constructor(seconds_histogram),
            queue_wait: Family::new_with_constructor(seconds_histogram),
            in_flight: Gauge::default(),
            free_slots: Gauge::default(),
            lock_renewals: Counter::default(),
            lock_losses: Counter::default(),
            retries_scheduled: Family::default(),
            dead_letters: Family::default(),
            broker_connects: Counter::default(),
            process_start: Family::new_with_constructor(start_histogram),
            daemon_faults: Family::default(),
            egress_connections: Family::default(),
            egress_bytes: Family::default(),
            tokens_issued: Family::default(),
            tokens_denied: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "jobs",
            "Jobs that ended, by worker and outcome",
            m.jobs.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Run time of a job's process",
            m.job_duration.clone(),
        );
        registry.register(
            "job_queue_wait_seconds",
            "From enqueue to the start of the job",
            m.queue_wait.clone(),
        );
        registry.register("jobs_in_flight", "Jobs running now", m.in_flight.clone());
        registry.register(
            "free_slots",
            "Job slots free now (the credit the broker may be given)",
            m.free_slots.clone(),
        );
        registry.register(
            "lock_renewals",
            "Message locks renewed",
            m.lock_renewals.clone(),
        );
        registry.register(
            "lock_losses",
            "Message locks lost while a job ran",
            m.lock_losses.clone(),
        );
        registry.register(
            "retries_scheduled",
            "Retries scheduled, by worker",
            m.retries_scheduled.clone(),
        );
        registry.register(
            "dead_letters",
            "Jobs dead-lettered, by reason",
            m.dead_letters.clone(),
        );
        registry.register(
            "broker_connects",
            "Connections opened to Service Bus",
            m.broker_connects.clone(),
        );
        registry.register(
            "process_start_seconds",
            "Time to start a job's process, by isolation mode",
            m.process_start.clone(),
        );
        registry.register(
            "daemon_faults",
            "Jobs the daemon could not start through its own fault, by stage",
            m.daemon_faults.clone(),
        );
        registry.register(
            "egress_connections",
            "Connections to the egress proxy, by worker and decision",
            m.egress_connections.clone(),
        );
        registry.register(
            "egress_bytes",
            "Bytes relayed by the egress proxy, by worker and direction (out: job to destination)",
            m.egress_bytes.clone(),
        );
        registry.register(
            "token_issued",
            "Entra ID tokens handed to jobs, by worker",
            m.tokens_issued.clone(),
        );
        registry.register(
            "token_denied",
            "Token requests of jobs refused by their worker's azure_scopes, by worker",
            m.tokens_denied.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A job could not be started through the daemon's own fault at `stage`.
    pub fn daemon_fault(&self, stage: &str) {
        self.daemon_faults
            .get_or_create(&StageLabel {
                stage: stage.to_owned(),
            })
            .inc();
    }

    /// Counts one connection to the egress proxy.
    pub fn egress_connection(&self, worker: &str, decision: &str) {
        self.egress_connections
            .get_or_create(&WorkerDecision {
                worker: worker.to_owned(),
                decision: decision.to_owned(),
            })
            .inc();
    }

    /// The counter of bytes the egress proxy relays for `worker` in `direction`.
    pub fn egress_bytes_counter(&self, worker: &str, direction: &str) -> Counter {
        self.egress_bytes
            .get_or_create(&WorkerDirection {
                worker: worker.to_owned(),
                direction: direction.to_owned(),
            })
            .clone()
    }

    /// A token was handed to a job of `worker`.
    pub fn token_issued(&self, worker: &str) {
        self.tokens_issued
            .get_or_create(&WorkerLabel {
                worker: worker.to_owned(),
            })
            .inc();
    }

    /// A job of `worker` asked for a token it may not have.
    pub fn token_denied(&self, worker: &str) {
        self.tokens_denied
            .get_or_create(&WorkerLabel {
                worker: worker.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a job's end.
    pub fn job_ended(&self, worker: &str, outcome: &str) {
        self.jobs
            .get_or_create(&WorkerOutcome {
                worker: worker.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn observe_duration(&self, worker: &str, took: Duration) {
        self.job_duration
            .get_or_create(&WorkerLabel {
                worker: worker.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn observe_queue_wait(&self, worker: &str, waited: Duration) {
        self.queue_wait
            .get_or_create(&WorkerLabel {
                worker: worker.to_owned(),
            })
            .observe(waited.as_secs_f64());
    }

    pub fn observe_process_start(&self, mode: &str, took: Duration) {
        self.process_start
            .get_or_create(&ModeLabel {
                mode: mode.to_owned(),
            })
            .observe(took.as_secs_f64());
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
