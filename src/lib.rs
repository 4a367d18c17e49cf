//! billsync: keeps AIPIX VMS users in step with BILLmanager and
//! ActivePlatform accounts. See ARCHITECTURE.md for the map.

pub mod allocator;
pub mod cli;
pub mod config;
pub mod core;
pub mod daemon;
pub mod emulators;
pub mod engine;
pub mod http;
pub mod sources;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod vms;
