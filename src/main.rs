use std::process::ExitCode;

/// mimalloc returns freed memory to the OS and fragments less than glibc's
/// malloc across tokio's threads: a daemon holding 100k accounts per cycle
/// stays near its working set instead of its high-water mark. (Set here, not
/// in the library, so tests may count allocations; the benches set it too.)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    billsync::allocator::purge_freed_memory_soon();
    let args = cli::Cli::parse();
    cli::run(args)
}
