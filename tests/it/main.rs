//! The integration tests: one binary, sharing one harness (`helpers`).

mod azurite;
mod cgroup;
mod cli;
mod dead_peer;
mod dlq;
mod emulator_limits;
mod engine;
mod helpers;
mod hostile;
mod hostile_egress;
mod hostile_secrets;
mod python_pin;
mod reply_policy;
mod runner;
mod servicebus;
mod servicebus_sessions;
mod sessions;
mod storage;
