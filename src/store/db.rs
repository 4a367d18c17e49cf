//! The seam between the store and its two backends (SPEC §13): a pool, a
//! pooled connection and a transaction of either SQLite or PostgreSQL, and
//! `on!`, which runs one block of query code against whichever it holds.
//! The SQL text is the same for both (`$N` placeholders, which sqlx's
//! SQLite driver binds by number too); the few statements that differ are
//! chosen by `Backend`.

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{ColumnIndex, Decode, Type};
use sqlx::{PgConnection, PgPool, Postgres, Sqlite, SqliteConnection, SqlitePool, Transaction};

use super::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// SQL for `column`'s JSON member `key`, as text.
    pub fn json_text(self, column: &str, key: &str) -> String {
        match self {
            Backend::Sqlite => format!("json_extract({column}, '$.{key}')"),
            Backend::Postgres => format!("({column}::jsonb ->> '{key}')"),
        }
    }

    /// SQL that holds when `column`'s JSON member `key` is true (an absent
    /// member is false).
    pub fn json_true(self, column: &str, key: &str) -> String {
        match self {
            Backend::Sqlite => format!("COALESCE(json_extract({column}, '$.{key}'), 0) = 1"),
            Backend::Postgres => {
                format!("COALESCE(({column}::jsonb ->> '{key}')::boolean, FALSE)")
            }
        }
    }
}

#[derive(Clone)]
pub(crate) enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

pub(crate) enum Pooled {
    Sqlite(PoolConnection<Sqlite>),
    Postgres(PoolConnection<Postgres>),
}

pub(crate) enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

pub(crate) enum Conn<'a> {
    Sqlite(&'a mut SqliteConnection),
    Postgres(&'a mut PgConnection),
}

impl Db {
    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    pub async fn acquire(&self) -> Result<Pooled> {
        Ok(match self {
            Db::Sqlite(p) => Pooled::Sqlite(p.acquire().await?),
            Db::Postgres(p) => Pooled::Postgres(p.acquire().await?),
        })
    }

    /// A transaction; on SQLite it takes the write lock when it begins
    /// (see `Store::write_tx`).
    pub async fn begin(&self, sqlite_immediate: bool) -> Result<Tx> {
        Ok(match self {
            Db::Sqlite(p) if sqlite_immediate => Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Db::Sqlite(p) => Tx::Sqlite(p.begin().await?),
            Db::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}

impl Pooled {
    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Pooled::Sqlite(c) => Conn::Sqlite(c),
            Pooled::Postgres(c) => Conn::Postgres(c),
        }
    }
}

impl Tx {
    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Tx::Sqlite(t) => Conn::Sqlite(t),
            Tx::Postgres(t) => Conn::Postgres(t),
        }
    }

    pub async fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.commit().await?,
            Tx::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }
}

/// A row of either backend, read by column as sqlx's `Row::get` reads.
pub(crate) enum Row {
    Sqlite(SqliteRow),
    Postgres(PgRow),
}

impl From<SqliteRow> for Row {
    fn from(r: SqliteRow) -> Self {
        Row::Sqlite(r)
    }
}

impl From<PgRow> for Row {
    fn from(r: PgRow) -> Self {
        Row::Postgres(r)
    }
}

impl Row {
    pub fn all<R: Into<Row>>(rows: Vec<R>) -> Vec<Row> {
        rows.into_iter().map(Into::into).collect()
    }

    pub fn opt<R: Into<Row>>(row: Option<R>) -> Option<Row> {
        row.map(Into::into)
    }

    /// The column's value; panics on a type the column cannot decode to,
    /// as `sqlx::Row::get` does (the schema is ours).
    pub fn get<'r, T, I>(&'r self, i: I) -> T
    where
        T: Decode<'r, Sqlite> + Type<Sqlite> + Decode<'r, Postgres> + Type<Postgres>,
        I: ColumnIndex<SqliteRow> + ColumnIndex<PgRow> + std::fmt::Debug,
    {
        match self {
            Row::Sqlite(r) => sqlx::Row::get(r, i),
            Row::Postgres(r) => sqlx::Row::get(r, i),
        }
    }
}

/// Runs `$body` with `$c` bound to the `&mut` connection of whichever
/// backend `$conn` (a `Conn`) holds: the body is compiled once per backend,
/// so a bind or a decode that one of them lacks is a compile error.
macro_rules! on {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::store::db::Conn::Sqlite($c) => $body,
            $crate::store::db::Conn::Postgres($c) => $body,
        }
    };
}

/// `on!` on a connection taken from the pool for this body alone.
macro_rules! on_pool {
    ($db:expr, |$c:ident| $body:expr) => {{
        let mut pooled = $db.acquire().await?;
        $crate::store::db::on!(pooled.conn(), |$c| $body)
    }};
}

/// `on!` for a write: in a fenced transaction of its own when the store
/// writes as a leader's epoch (`Store::write_tx`), committed when the body
/// succeeds; else on a pooled connection, as one statement commits by
/// itself (a transaction around it would only hold SQLite's write lock
/// longer, across three trips to its worker thread).
macro_rules! on_write {
    ($store:expr, |$c:ident| $body:expr) => {{
        match $store.fenced_tx().await? {
            Some(mut tx) => {
                let out = $crate::store::db::on!(tx.conn(), |$c| $body)?;
                tx.commit().await?;
                Ok::<_, $crate::store::StoreError>(out)
            }
            None => {
                let mut pooled = $store.db.acquire().await?;
                let out = $crate::store::db::on!(pooled.conn(), |$c| $body)?;
                Ok::<_, $crate::store::StoreError>(out)
            }
        }
    }};
}

pub(crate) use {on, on_pool, on_write};
