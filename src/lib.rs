//! hybrid-worker: the execution tier under Power Platform.
//!
//! Flows put jobs on an Azure Service Bus queue; this daemon takes each with peek-lock, runs it
//! in a fresh Python process inside its worker's pinned virtualenv, and answers with a result
//! message (or dead-letters it with a reason). The life of a job, file by file:
//!
//! 1. [`config`] — the checked configuration: queues, concurrency, drain deadline, venv root.
//! 2. [`broker`] — the narrow broker interface; [`broker::memory`] implements it in memory.
//! 3. [`engine`] — receives with credit = free slots, one task per job
//!    ([`engine::Engine::run`]).
//! 4. [`job`] — the message becomes a typed [`job::Job`], or a `MalformedJob` error.
//! 5. [`engine::executor`] — picks the worker ([`worker`]) and checks policy and its venv
//!    ([`worker::venv`]).
//! 6. [`engine::lock`] — keeps the message's lock while the job runs.
//! 7. [`runner`] — one OS process per job: [`runner::child`] starts and ends it (spawn mode),
//!    or [`runner::warm`] has the worker's warm parent fork it (fork mode); [`python_runtime`] is the
//!    Python side (`hybrid_worker`), [`runner::output`] reads its channel and output;
//!    [`sandbox`] confines it (limits, uid, Landlock, seccomp, and a job cgroup from
//!    [`sandbox::cgroup`] where one is delegated) before its interpreter starts.
//! 8. [`engine::settle`] — the one mapping from outcome to broker actions: reply + complete,
//!    scheduled retry ([`engine::retry`]) + complete, reply + dead-letter, or abandon.
//!
//! Around it: [`cli`] (the commands), [`commands`] (what each does), [`shutdown`] (signals),
//! [`telemetry`] (logs), [`servicebus`] (the [`broker`] interface over Azure Service Bus:
//! receiving, lock renewal, replies and settlement) and [`emulator`] (the local Service Bus
//! that `run` starts when none is configured).

pub mod broker;
pub mod cli;
pub mod commands;
pub mod config;
pub mod egress;
pub mod engine;
pub mod job;
pub mod python_runtime;
pub mod runner;
pub mod sandbox;
pub mod secrets;
pub mod servicebus;
pub mod shutdown;
pub mod storage;
pub mod telemetry;
pub mod worker;

/// The embedded Service Bus emulator (`run`'s local default, `hybrid-worker emulator`): its own
/// crate, `crates/servicebus-emulator`, re-exported under the name the daemon's modules use.
pub use servicebus_emulator as emulator;
