//! The store on PostgreSQL (SPEC §13): the same tables as on SQLite, from
//! `migrations/postgres` (numbered as `migrations/sqlite`). Every session
//! but the migration's bounds how long it may hold a transaction open or
//! run a statement, so a node that vanished mid-transaction holds no row
//! lock for long.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::Executor;

use super::db::{on_pool, Backend, Db};
use super::{Result, Schema, Store, StoreError, NEWER, OLDER};

/// Without sqlx's session advisory lock (SPEC §13: none, for a pooling
/// proxy): only the leader migrates, and a first migration that races
/// another node's is retried (`Store::migrate_first`).
static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> = std::sync::LazyLock::new(|| {
    let mut m = sqlx::migrate!("./migrations/postgres");
    m.set_locking(false);
    m
});

pub(super) fn migrator() -> &'static sqlx::migrate::Migrator {
    &MIGRATOR
}

/// Runs the migrations on a session of their own without the sessions'
/// time bounds (a migration of a large store may take longer than a
/// lease; the leader renews meanwhile), closed afterwards.
pub(super) async fn migrate(pool: &sqlx::PgPool) -> Result<()> {
    let opts = (*pool.connect_options()).clone();
    let own = PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                let unbounded =
                    "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0";
                conn.execute(unbounded).await.map(drop)
            })
        })
        .connect_with(opts)
        .await?;
    let run = MIGRATOR.run(&own).await;
    own.close().await;
    Ok(run?)
}

/// The URL without its password, for messages.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "postgres://(unparsable URL)".into(),
    }
}

impl Store {
    /// The configured store, opened and migrated: PostgreSQL at
    /// `state_url` when it is set (`daemon.state_url`), else the SQLite
    /// file at `state_path`. A PostgreSQL session may hold a transaction
    /// or run a statement for less than the lease (SPEC §13).
    pub async fn open_configured(
        state_url: Option<&str>,
        state_path: &std::path::Path,
        lease_secs: u64,
    ) -> Result<Self> {
        match state_url {
            Some(url) => Self::open_postgres(url, bound(lease_secs)).await,
            None => Self::open(state_path).await,
        }
    }

    /// Connects and migrates: for `run` and `sync`.
    pub async fn open_postgres(url: &str, timeout: Duration) -> Result<Self> {
        let store = Self::connect_postgres(url, timeout, Access::ReadWrite).await?;
        if store.schema().await? == Schema::Newer {
            return Err(store.schema_error(NEWER));
        }
        store.migrate().await?;
        store.upgrade_hashes().await?;
        Ok(store)
    }

    /// The configured store as it is, never migrating: for the commands
    /// that read it or file a request beside a daemon of another version
    /// (`Store::open_current` on SQLite). Another schema is refused.
    pub async fn open_configured_current(
        state_url: Option<&str>,
        state_path: &std::path::Path,
        lease_secs: u64,
    ) -> Result<Self> {
        let Some(url) = state_url else {
            return Self::open_current(state_path).await;
        };
        let store = Self::connect_postgres(url, bound(lease_secs), Access::ReadWrite).await?;
        match store.schema().await? {
            Schema::Current => Ok(store),
            Schema::Newer => Err(store.schema_error(NEWER)),
            Schema::Older => Err(store.schema_error(OLDER)),
        }
    }

    /// Connects without migrating (SPEC §13: only a leader migrates); a
    /// newer schema is refused. `migrate_now` when this node leads.
    pub async fn open_postgres_unmigrated(url: &str, timeout: Duration) -> Result<Self> {
        let store = Self::connect_postgres(url, timeout, Access::ReadWrite).await?;
        if store.schema().await? == Schema::Newer {
            return Err(store.schema_error(NEWER));
        }
        Ok(store)
    }

    /// Sessions for the lease statements alone, apart from the engine's
    /// pool (whose writers may hold every connection at once).
    pub async fn open_postgres_lease(url: &str, timeout: Duration) -> Result<Self> {
        Self::connect_postgres(url, timeout, Access::Lease).await
    }

    /// Whether the schema has the lease yet (a store made before it, or
    /// none at all, is migrated before anyone can lead it).
    pub async fn has_lease_table(&self) -> Result<bool> {
        let sql = match self.backend() {
            Backend::Postgres => "SELECT to_regclass('lease') IS NOT NULL",
            Backend::Sqlite => {
                "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'lease'"
            }
        };
        Ok(on_pool!(self.db, |c| sqlx::query_scalar(sql)
            .fetch_one(c)
            .await)?)
    }

    /// Applies this binary's migrations and re-derives stored hashes: by
    /// the leader, once it leads (a newer schema is refused).
    pub async fn migrate_now(&self) -> Result<()> {
        if self.schema().await? == Schema::Newer {
            return Err(self.schema_error(NEWER));
        }
        self.migrate().await?;
        self.upgrade_hashes().await
    }

    /// Migrates a store nobody can lead yet (no lease table). Two nodes
    /// starting at once on an empty database may both try: the one that
    /// collides waits for the other's schema, retrying what is missing.
    pub async fn migrate_first(&self) -> Result<()> {
        let mut tries = 0;
        loop {
            match self.migrate_now().await {
                Ok(()) => return Ok(()),
                Err(_) if self.schema().await? == Schema::Current => return Ok(()),
                Err(e) if tries >= 10 => return Err(e),
                Err(e) => tracing::debug!(error = %e, "migration collided; retrying"),
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Connects as it is, never migrating, every session read-only at the
    /// database (a dry run beside the leader, SPEC §13; the commands that
    /// only read). A newer schema is refused.
    pub async fn open_postgres_read_only(url: &str, timeout: Duration) -> Result<Self> {
        let store = Self::connect_postgres(url, timeout, Access::ReadOnly).await?;
        if store.schema().await? == Schema::Newer {
            return Err(store.schema_error(NEWER));
        }
        Ok(store)
    }

    async fn connect_postgres(url: &str, timeout: Duration, access: Access) -> Result<Self> {
        let where_ = redacted(url);
        let open_err = |message: String| StoreError::Open {
            path: where_.clone(),
            message,
        };
        // Not the parser's message: it may quote the URL, password included.
        let opts = PgConnectOptions::from_str(url)
            .map_err(|_| open_err("daemon.state_url is not a valid postgres:// URL".into()))?;
        let ms = timeout.as_millis().max(1);
        // A vanished node's open transaction holds the lease row from a
        // takeover: it ends within a third of the lease (the renew interval).
        let idle_ms = (timeout.as_millis() / 3).max(1000);
        let pool = PgPoolOptions::new()
            .max_connections(access.connections())
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    // A read-only session holds no row lock: its snapshot
                    // copy may take longer than a lease.
                    let set = match access {
                        Access::ReadWrite | Access::Lease => format!(
                            "SET idle_in_transaction_session_timeout = {idle_ms}; \
                             SET statement_timeout = {ms}"
                        ),
                        Access::ReadOnly => "SET default_transaction_read_only = on".into(),
                    };
                    conn.execute(set.as_str()).await.map(drop)
                })
            })
            .connect_with(opts)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            db: Db::Postgres(pool),
            path: where_.into(),
            fence: Default::default(),
        })
    }
}

/// How long a session may hold a transaction open or run a statement:
/// less than the lease.
pub fn bound(lease_secs: u64) -> Duration {
    Duration::from_secs(lease_secs.saturating_sub(1).max(1))
}

#[derive(Debug, Clone, Copy)]
enum Access {
    ReadWrite,
    /// Every transaction of every session read-only, by the database.
    ReadOnly,
    /// The lease's own sessions: a renewal never waits for a connection
    /// the engine's writers hold.
    Lease,
}

impl Access {
    fn connections(self) -> u32 {
        match self {
            Access::Lease => 2,
            Access::ReadWrite | Access::ReadOnly => 8,
        }
    }
}

/// Copies every table of the store, read as one snapshot in a read-only
/// transaction, into a new SQLite file at `dest`: what a dry run plans on.
/// It writes nothing to the shared store and holds no row lock there.
pub(super) async fn copy_to_sqlite(pool: &sqlx::PgPool, dest: &std::path::Path) -> Result<()> {
    let target = Store::open(dest).await?;
    let Db::Sqlite(sqlite) = &target.db else {
        unreachable!("Store::open is SQLite")
    };
    let mut src = pool.begin().await?;
    let snapshot = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY";
    sqlx::query(snapshot).execute(&mut *src).await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::TEXT FROM information_schema.tables
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'
           AND table_name <> '_sqlx_migrations'
         ORDER BY table_name",
    )
    .fetch_all(&mut *src)
    .await?;
    let mut dst = sqlite.begin().await?;
    for table in &tables {
        copy_table(&mut src, &mut dst, table).await?;
    }
    dst.commit().await?;
    src.rollback().await?;
    target.close().await;
    Ok(())
}

/// One table, row by row; the columns are this schema's, so their types
/// are text, 64-bit integers and booleans. A row the target already holds
/// (the `meta` the new file wrote when it opened) is replaced.
async fn copy_table(
    src: &mut sqlx::PgConnection,
    dst: &mut sqlx::SqliteConnection,
    table: &str,
) -> Result<()> {
    use futures::TryStreamExt;
    use sqlx::{Column, Row, TypeInfo};
    let select = format!("SELECT * FROM {table}");
    let mut rows = sqlx::query(&select).fetch(&mut *src);
    while let Some(row) = rows.try_next().await? {
        let cols = row.columns();
        let names: Vec<&str> = cols.iter().map(|c| c.name()).collect();
        let marks: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        let insert = format!(
            "INSERT OR REPLACE INTO {table} ({}) VALUES ({})",
            names.join(", "),
            marks.join(", ")
        );
        let mut q = sqlx::query(&insert);
        for (i, col) in cols.iter().enumerate() {
            q = match col.type_info().name() {
                "INT8" => q.bind(row.try_get::<Option<i64>, _>(i)?),
                "BOOL" => q.bind(row.try_get::<Option<bool>, _>(i)?),
                "TEXT" => q.bind(row.try_get::<Option<String>, _>(i)?),
                other => {
                    let why = format!("{table}.{}: unexpected type {other}", col.name());
                    return Err(StoreError::Decode(why));
                }
            };
        }
        q.execute(&mut *dst).await?;
    }
    Ok(())
}
