//! The integration tests: one binary, sharing one harness (`helpers`).

mod cli;
mod engine;
mod helpers;
mod runner;
mod servicebus;
