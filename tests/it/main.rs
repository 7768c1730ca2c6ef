//! The integration tests: one binary, sharing one harness (`helpers`).

mod azurite;
mod cgroup;
mod cli;
mod engine;
mod helpers;
mod hostile;
mod runner;
mod servicebus;
mod storage;
