//! The SQLite state store: sqlx, migrations embedded from `migrations/`,
//! WAL, a busy timeout, and a file created with mode 0600. One module per
//! aggregate: source accounts (read side), applied state, plan, retry and
//! quarantine, history. It imports the core's types, never a source.

mod accounts;
mod applied;
pub(crate) mod db;
mod history;
mod lease;
mod lock;
mod logins;
mod plan;
mod postgres;
mod retry;
mod services;
#[cfg(test)]
mod testing;
mod verify;

pub use accounts::{AccountIndexEntry, Fresh, InvalidRow, ReadStamp, StoredAccount};
pub use applied::InDoubt;
pub use history::{
    AuditEntry, AuditRow, DroppedRequest, LastCycle, Notice, RequestKind, Requests, TriggerBody,
};
pub use lease::{Claim, LeaseRow};
pub use lock::{holder as lock_holder, StateLock};
pub use logins::{AccountPages, IndexEntry, Indexed, Scanned};
pub use plan::{ConflictRow, DesiredRow, PlanRow, PlanState};
pub use retry::{QuarantineEntry, QuarantinePart, RetryInfo};
pub use services::ListedService;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
pub use db::Backend;
use db::{on_pool, Db, Tx};
pub use postgres::{bound as pg_bound, redacted as redacted_url};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::core::model::{AccountKey, SourceKind};

#[derive(Clone)]
pub struct Store {
    pub(crate) db: Db,
    path: PathBuf,
    /// The lease epoch this node writes as (SPEC §13), 0 while it writes
    /// as nobody's leader (SQLite, a standby's requests). Shared by clones.
    fence: std::sync::Arc<std::sync::atomic::AtomicI64>,
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
    #[error("state store {path}: {message}")]
    Schema { path: String, message: String },
    /// Another node leads now: this one must stop writing (SPEC §13).
    #[error(
        "state store: fenced: this node wrote as leader epoch {mine}, the lease is at epoch {now}"
    )]
    Fenced { mine: i64, now: i64 },
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

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// How the schema of a state file compares with this binary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schema {
    Current,
    /// Migrations this binary has are not applied yet (or none at all).
    Older,
    /// Migrations this binary does not know are applied.
    Newer,
}

impl Store {
    /// Opens (creating with mode 0600 if needed) and migrates: for `run`
    /// and `sync`, which hold the state lock.
    pub async fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(path, format!("cannot create {}: {e}", dir.display())))?;
        }
        create_private(path).map_err(|e| open_err(path, format!("cannot create: {e}")))?;
        let store = Self::connect(path).await?;
        if store.schema().await? == Schema::Newer {
            return Err(schema_err(path, NEWER));
        }
        store.migrate().await?;
        store.upgrade_hashes().await?;
        Ok(store)
    }

    /// Opens a state file as it is, never migrating: for the commands that
    /// may run beside a daemon of another version (`status`, `explain`,
    /// `quarantine`, `resync`, `approve`). A file of another schema is refused.
    pub async fn open_current(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(open_err(
                path,
                "no state file yet: billsync has not run".into(),
            ));
        }
        let store = Self::connect(path).await?;
        match store.schema().await? {
            Schema::Current => Ok(store),
            Schema::Newer => Err(schema_err(path, NEWER)),
            Schema::Older => Err(schema_err(path, OLDER)),
        }
    }

    /// Opens a state file for reading only, as it is (an older schema too;
    /// a newer one is refused): what a dry run beside a daemon snapshots.
    /// No file yet: `None` (nothing has run).
    pub async fn open_read_only(path: &Path) -> Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await
            .map_err(|e| open_err(path, e.to_string()))?;
        let store = Self {
            db: Db::Sqlite(pool),
            path: path.to_path_buf(),
            fence: Default::default(),
        };
        if store.schema().await? == Schema::Newer {
            return Err(schema_err(path, NEWER));
        }
        Ok(Some(store))
    }

    async fn connect(path: &Path) -> Result<Self> {
        // A path, not a URL: any character a file name may hold is fine.
        let opts = SqliteConnectOptions::new()
            .filename(path)
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
            .map_err(|e| open_err(path, e.to_string()))?;
        Ok(Self {
            db: Db::Sqlite(pool),
            path: path.to_path_buf(),
            fence: Default::default(),
        })
    }

    async fn schema(&self) -> Result<Schema> {
        let exists = match self.db.backend() {
            Backend::Sqlite => {
                "SELECT COUNT(*) > 0 FROM sqlite_master
                 WHERE type = 'table' AND name = '_sqlx_migrations'"
            }
            Backend::Postgres => "SELECT to_regclass('_sqlx_migrations') IS NOT NULL",
        };
        let table: bool = on_pool!(self.db, |c| sqlx::query_scalar(exists).fetch_one(c).await)?;
        if !table {
            return Ok(Schema::Older);
        }
        let applied: Vec<i64> = on_pool!(self.db, |c| sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success = TRUE"
        )
        .fetch_all(c)
        .await)?;
        let known = self.migrator().iter().map(|m| m.version);
        Ok(compare_schema(&applied, known))
    }

    fn migrator(&self) -> &'static Migrator {
        match self.db.backend() {
            Backend::Sqlite => &MIGRATOR,
            Backend::Postgres => postgres::migrator(),
        }
    }

    fn schema_error(&self, message: &str) -> StoreError {
        schema_err(&self.path, message)
    }

    pub fn backend(&self) -> Backend {
        self.db.backend()
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

    /// Copies the store to a new SQLite file at `dest`, for a dry run that
    /// must change nothing: `VACUUM INTO` on SQLite, a snapshot read table
    /// by table on PostgreSQL.
    pub async fn snapshot_to(&self, dest: &std::path::Path) -> Result<()> {
        match &self.db {
            Db::Sqlite(pool) => {
                sqlx::query("VACUUM INTO $1")
                    .bind(dest.display().to_string())
                    .execute(pool)
                    .await?;
            }
            Db::Postgres(pool) => postgres::copy_to_sqlite(pool, dest).await?,
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers when the database does: for health checks.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self.db, |c| sqlx::query("SELECT 1")
            .execute(c)
            .await
            .map(drop))?;
        Ok(())
    }

    pub async fn close(&self) {
        self.db.close().await;
    }

    /// A write transaction that takes the write lock when it begins. The
    /// daemon's two lanes write at once; a deferred transaction that read
    /// first would fail outright (SQLITE_BUSY, no wait) if the other lane
    /// committed meanwhile, where this one waits out the busy timeout.
    ///
    /// Fenced (SPEC §13): once this node writes as a leader's epoch, each
    /// write transaction first reads the lease's epoch `FOR KEY SHARE`
    /// until it ends, and fails when a newer one exists. A takeover locks
    /// the row `FOR UPDATE`, so it waits for these; a renewal does not.
    pub(crate) async fn write_tx(&self) -> Result<Tx> {
        let mut tx = self.db.begin(true).await?;
        let mine = self.fence.load(std::sync::atomic::Ordering::SeqCst);
        if mine > 0 {
            let lease = "SELECT epoch FROM lease WHERE name = 'leader' FOR KEY SHARE";
            let now: Option<i64> = match &mut tx {
                Tx::Postgres(t) => sqlx::query_scalar(lease).fetch_optional(&mut **t).await?,
                // One writer by the file lock; no row locks to take.
                Tx::Sqlite(_) => Some(mine),
            };
            if now != Some(mine) {
                return Err(StoreError::Fenced {
                    mine,
                    now: now.unwrap_or(0),
                });
            }
        }
        Ok(tx)
    }

    /// A fenced write transaction when this store writes as a leader's
    /// epoch; None when it writes as nobody's (SQLite, a single node).
    pub(crate) async fn fenced_tx(&self) -> Result<Option<Tx>> {
        match self.fence.load(std::sync::atomic::Ordering::SeqCst) {
            0 => Ok(None),
            _ => Ok(Some(self.write_tx().await?)),
        }
    }

    /// Writes from now on as the leader of `epoch` (0: as nobody's).
    pub fn fence(&self, epoch: i64) {
        self.fence.store(epoch, std::sync::atomic::Ordering::SeqCst);
    }

    async fn migrate(&self) -> Result<()> {
        match &self.db {
            Db::Sqlite(p) => MIGRATOR.run(p).await?,
            Db::Postgres(p) => postgres::migrate(p).await?,
        }
        Ok(())
    }
}

const OLDER: &str = "written by an older billsync; it is upgraded when `billsync run` \
     (restart the service) or `billsync sync` starts";

const NEWER: &str = "written by a newer billsync; refusing to use it (install that version, \
     or restore a backup taken before the upgrade)";

fn open_err(path: &Path, message: String) -> StoreError {
    StoreError::Open {
        path: path.display().to_string(),
        message,
    }
}

fn schema_err(path: &Path, message: &str) -> StoreError {
    StoreError::Schema {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn compare_schema(applied: &[i64], known: impl Iterator<Item = i64>) -> Schema {
    let known: std::collections::BTreeSet<i64> = known.collect();
    if applied.iter().any(|v| !known.contains(v)) {
        Schema::Newer
    } else if known.len() > applied.len() {
        Schema::Older
    } else {
        Schema::Current
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
    use super::db::on;
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

    /// `#`, `?`, `%` and spaces are a file name's, not a URL's.
    #[tokio::test]
    async fn any_file_name_is_a_state_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data #1 ?x %41").join("state.db");
        let store = Store::open(&path).await.unwrap();
        store.set_meta("probe", "1").await.unwrap();
        store.close().await;
        assert!(path.is_file(), "not created at {}", path.display());
        let again = Store::open_current(&path).await.unwrap();
        assert_eq!(again.meta("probe").await.unwrap().as_deref(), Some("1"));
    }

    async fn versions(store: &Store) -> Vec<i64> {
        on!(store.db.acquire().await.unwrap().conn(), |c| {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(c)
                .await
        })
        .unwrap()
    }

    /// `status` beside an older daemon must not upgrade its file.
    #[tokio::test]
    async fn an_older_file_is_refused_not_migrated_by_readers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = Store::open(&path).await.unwrap();
        let all = versions(&store).await;
        on!(store.db.acquire().await.unwrap().conn(), |c| sqlx::query(
            "DELETE FROM _sqlx_migrations WHERE version = ?"
        )
        .bind(all.last())
        .execute(c)
        .await
        .map(drop))
        .unwrap();
        let e = Store::open_current(&path).await.err().expect("refused");
        assert!(e.to_string().contains("older billsync"), "{e}");
        assert_eq!(versions(&store).await.len(), all.len() - 1, "migrated");
        assert!(Store::open_current(&dir.path().join("none.db"))
            .await
            .is_err());
        assert!(!dir.path().join("none.db").exists());
    }

    #[tokio::test]
    async fn a_newer_file_is_refused_by_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = Store::open(&path).await.unwrap();
        on!(store.db.acquire().await.unwrap().conn(), |c| sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (99990101000000, 'from the future', 1, x'00', 0)",
        )
        .execute(c)
        .await.map(drop))
        .unwrap();
        for e in [
            Store::open(&path).await.err(),
            Store::open_current(&path).await.err(),
        ] {
            let e = e.expect("refused");
            assert!(e.to_string().contains("newer billsync"), "{e}");
        }
    }

    #[test]
    fn schema_comparison() {
        let known = || [1, 2, 3].into_iter();
        assert_eq!(compare_schema(&[1, 2, 3], known()), Schema::Current);
        assert_eq!(compare_schema(&[1, 2], known()), Schema::Older);
        assert_eq!(compare_schema(&[], known()), Schema::Older);
        assert_eq!(compare_schema(&[1, 2, 3, 4], known()), Schema::Newer);
        assert_eq!(compare_schema(&[1, 4], known()), Schema::Newer);
    }
}
