//! billsync: keeps AIPIX VMS users in step with BILLmanager and
//! ActivePlatform accounts. See ARCHITECTURE.md for the map.

/// mimalloc returns freed memory to the OS and fragments less than glibc's
/// malloc across tokio's threads: a daemon holding 100k accounts per cycle
/// stays near its working set instead of its high-water mark.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
