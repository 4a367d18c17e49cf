//! The store on PostgreSQL (SPEC §13): the same tables as on SQLite, from
//! `migrations/postgres` (numbered as `migrations/sqlite`). Every session
//! bounds how long it may hold a transaction open or run a statement, so
//! a node that vanished mid-transaction holds no row lock for long.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::Executor;

use super::db::Db;
use super::{Result, Schema, Store, StoreError, NEWER};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

pub(super) fn migrator() -> &'static sqlx::migrate::Migrator {
    &MIGRATOR
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
            Some(url) => {
                let bound = Duration::from_secs(lease_secs.saturating_sub(1).max(1));
                Self::open_postgres(url, bound).await
            }
            None => Self::open(state_path).await,
        }
    }

    /// Connects and migrates: for `run` and `sync`.
    pub async fn open_postgres(url: &str, timeout: Duration) -> Result<Self> {
        let store = Self::connect_postgres(url, timeout).await?;
        if store.schema().await? == Schema::Newer {
            return Err(store.schema_error(NEWER));
        }
        store.migrate().await?;
        store.upgrade_hashes().await?;
        Ok(store)
    }

    pub(super) async fn connect_postgres(url: &str, timeout: Duration) -> Result<Self> {
        let where_ = redacted(url);
        let open_err = |message: String| StoreError::Open {
            path: where_.clone(),
            message,
        };
        let opts = PgConnectOptions::from_str(url).map_err(|e| open_err(e.to_string()))?;
        let ms = timeout.as_millis().max(1);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    let set = format!(
                        "SET idle_in_transaction_session_timeout = {ms}; \
                         SET statement_timeout = {ms}"
                    );
                    conn.execute(set.as_str()).await.map(drop)
                })
            })
            .connect_with(opts)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            db: Db::Postgres(pool),
            path: where_.into(),
        })
    }
}
