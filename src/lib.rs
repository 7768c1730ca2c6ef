//! hybrid-worker: the execution tier under Power Platform.
pub mod emulator;
