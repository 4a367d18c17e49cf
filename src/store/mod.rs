//! The SQLite state store: sqlx, migrations embedded from `migrations/`,
//! WAL, a busy timeout, and a file created with mode 0600. One module per
//! aggregate: source accounts (read side), applied state, plan, retry and
//! quarantine, history. It imports the core's types, never a source.

mod accounts;
mod applied;
mod history;
mod lock;
mod plan;
mod retry;

pub use accounts::{AccountIndexEntry, InvalidRow, StoredAccount};
pub use applied::InDoubt;
pub use history::{AuditEntry, AuditRow, LastCycle, Notice, RequestKind, Requests};
pub use lock::StateLock;
pub use plan::{ConflictRow, DesiredRow, PlanRow, PlanState};
pub use retry::{QuarantineEntry, QuarantinePart, RetryInfo};

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use crate::core::model::{AccountKey, SourceKind};

#[derive(Clone)]
pub struct Store {
    pub(crate) pool: SqlitePool,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {message}")]
    Open { path: String, message: String },
    #[error("state store: {0}")]
    Db(#[from] sqlx::Error),
    #[error("state store: migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("state store: corrupt row: {0}")]
    Decode(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Which definition of `state_hash` the stored hashes follow.
const HASH_KEY: &str = "state_hash";
const HASH_VERSION: &str = "2-compared-fields";

fn account_key(source: &str, id: String) -> Result<AccountKey> {
    Ok(AccountKey {
        source: SourceKind::parse(source)
            .ok_or_else(|| StoreError::Decode(format!("unknown source {source}")))?,
        id,
    })
}

fn decode_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Decode(e.to_string()))
}

pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse_ts(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

impl Store {
    /// Opens (creating with mode 0600 if needed) and migrates.
    pub async fn open(path: &Path) -> Result<Self> {
        let open_err = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(format!("cannot create {}: {e}", dir.display())))?;
        }
        create_private(path).map_err(|e| open_err(format!("cannot create: {e}")))?;
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|e| open_err(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let store = Self {
            pool,
            path: path.to_path_buf(),
        };
        store.upgrade_hashes().await?;
        Ok(store)
    }

    /// Stored hashes follow `core::plan::state_hash`; rows written under an
    /// older definition are re-hashed once, or every login would look
    /// changed for ever.
    async fn upgrade_hashes(&self) -> Result<()> {
        if self.meta(HASH_KEY).await?.as_deref() == Some(HASH_VERSION) {
            return Ok(());
        }
        let n = self.rehash_states().await?;
        if n > 0 {
            tracing::info!(rows = n, "state hashes re-derived after an upgrade");
        }
        self.set_meta(HASH_KEY, HASH_VERSION).await
    }

    /// Copies the database to `dest` (for a dry run that must change nothing).
    pub async fn snapshot_to(&self, dest: &std::path::Path) -> Result<()> {
        sqlx::query("VACUUM INTO ?")
            .bind(dest.display().to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers when the database does: for health checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Creates the file with 0600 before SQLite does (SQLite gives its WAL and
/// shm files the main file's mode).
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::fs::OpenOptions;
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        OpenOptions::new()
            .write(true)
            .create(true)
            .open(path)
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn creates_private_file_and_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.db");
        let store = Store::open(&path).await.unwrap();
        store.ping().await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Opening again is idempotent.
        store.close().await;
        Store::open(&path).await.unwrap().ping().await.unwrap();
    }
}
