//! Tuning of mimalloc, the process's allocator (set in `main.rs` and the
//! benches; the library leaves the choice to them).

use std::ffi::c_long;

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// `mi_option_purge_delay` in the `mimalloc.h` of mimalloc v3 (what
/// libmimalloc-sys builds by default), which names no constant for it.
/// The test below fails if it moves.
const PURGE_DELAY: mi_option_t = 15;

/// Freed pages go back to the OS after 10 ms instead of a second. A cycle's
/// sources are read on worker threads that then idle, and what they freed
/// stayed resident through the rest of the cycle. Measured in
/// benches/sync.rs at 100k accounts: 0 ms saves the most memory but costs
/// 15 % of a no-op cycle's time in purges; 10 ms keeps most of the saving.
pub const PURGE_DELAY_MS: c_long = 10;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`].
pub fn purge_freed_memory_soon() {
    // SAFETY: sets a process-wide option; mimalloc allows it at any time.
    unsafe { mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) }
}

/// The current purge delay in milliseconds.
pub fn purge_delay_ms() -> c_long {
    // SAFETY: reads a process-wide option.
    unsafe { mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_option_set_is_the_purge_delay() {
        // mimalloc v3's default purge delay is 1000 ms; no neighbour option
        // defaults to 1000, so a shifted index fails here.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(super::purge_delay_ms(), 1000);
        }
        super::purge_freed_memory_soon();
        assert_eq!(super::purge_delay_ms(), super::PURGE_DELAY_MS);
    }
}
