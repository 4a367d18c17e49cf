//! One writer per state file: an exclusive advisory lock on `STATE.lock`,
//! held for the life of `run` or `sync`, released by the kernel on any exit.
//! The holder writes its pid into the file, so others can say who holds it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct StateLock {
    _file: File,
    pub path: PathBuf,
}

fn lock_path(state_path: &Path) -> PathBuf {
    let mut name = state_path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The pid of the live billsync that holds the lock, if any (read from the
/// lock file, never by taking the lock: that could refuse a starting daemon).
pub fn holder(state_path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(lock_path(state_path)).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    // A holder killed with -9 leaves its pid behind: it must still run.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("billsync")
        .then_some(pid)
}

impl StateLock {
    pub fn try_acquire(state_path: &Path) -> Result<Self, String> {
        let path = lock_path(state_path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {
                let _ = file.set_len(0);
                let _ = write!(&file, "{}", std::process::id());
                Ok(Self { _file: file, path })
            }
            Err(std::fs::TryLockError::WouldBlock) => Err(format!(
                "the state store {} is in use by {} (run or sync; lock {}); \
                 `sync --dry-run`, `status` and `explain` work beside it",
                state_path.display(),
                match holder(state_path) {
                    Some(pid) => format!("billsync pid {pid}"),
                    None => "another billsync".into(),
                },
                path.display()
            )),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(format!("cannot lock {}: {e}", path.display()))
            }
        }
    }
}

impl Drop for StateLock {
    /// A clean exit leaves no pid behind.
    fn drop(&mut self) {
        let _ = self._file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.db");
        let first = StateLock::try_acquire(&state).unwrap();
        let err = StateLock::try_acquire(&state).err().unwrap();
        assert!(err.contains("in use"), "{err}");
        // This test runs in a process whose name holds "billsync".
        let me = std::process::id();
        assert_eq!(holder(&state), Some(me));
        assert!(err.contains(&format!("billsync pid {me}")), "{err}");
        drop(first);
        assert_eq!(holder(&state), None, "a released lock names no holder");
        assert!(StateLock::try_acquire(&state).is_ok());
    }
}
