//! One writer per state file: an exclusive advisory lock on `STATE.lock`,
//! held for the life of `run` or `sync`, released by the kernel on any exit.

use std::fs::File;
use std::path::{Path, PathBuf};

pub struct StateLock {
    _file: File,
    pub path: PathBuf,
}

impl StateLock {
    pub fn try_acquire(state_path: &Path) -> Result<Self, String> {
        let mut name = state_path.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
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
            Ok(()) => Ok(Self { _file: file, path }),
            Err(std::fs::TryLockError::WouldBlock) => Err(format!(
                "the state store {} is in use by another billsync (run or sync); lock {}",
                state_path.display(),
                path.display()
            )),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(format!("cannot lock {}: {e}", path.display()))
            }
        }
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
        drop(first);
        assert!(StateLock::try_acquire(&state).is_ok());
    }
}
