//! billsync: keeps AIPIX VMS users in step with BILLmanager and
//! ActivePlatform accounts. See ARCHITECTURE.md for the map. The pure core
//! is its own crate (`billsync-core`, here as `core`); the command line is
//! the binary's (`src/main.rs`, `src/cli/`); the emulators are
//! `billsync-emulators`, which this library does not use.

pub use billsync_core as core;

pub mod allocator;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod http;
pub mod lease;
pub mod sources;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod vms;
