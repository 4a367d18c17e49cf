//! What the integration tests and benches share: a lab's config, loaded.

use billsync::config::{self, ConfigError, Settings};
use billsync_emulators::lab::Lab;

pub trait LabSettings {
    /// Writes the lab's config with `extra` appended and loads it with `env`
    /// overrides, as `billsync` would.
    fn settings(&self, extra: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError>;
}

impl LabSettings for Lab {
    fn settings(&self, extra: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let path = self.write_config(extra);
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        config::load(&path, &env).map(|(s, _)| s)
    }
}

/// The lab's state store, opened as a test pokes it behind billsync's
/// back: raw SQL (`$N` placeholders) on whichever backend the lab uses.
/// (Not every test binary pokes it.)
#[allow(dead_code)]
pub enum StateDb {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

#[allow(dead_code)]
impl StateDb {
    pub async fn open(lab: &Lab) -> Self {
        match &lab.state_url {
            Some(url) => StateDb::Postgres(sqlx::PgPool::connect(url).await.unwrap()),
            None => StateDb::Sqlite(
                sqlx::SqlitePool::connect_with(
                    sqlx::sqlite::SqliteConnectOptions::new().filename(lab.state_path()),
                )
                .await
                .unwrap(),
            ),
        }
    }

    /// Runs a statement that binds nothing.
    pub async fn execute(&self, sql: &str) {
        match self {
            StateDb::Sqlite(p) => drop(sqlx::query(sql).execute(p).await.unwrap()),
            StateDb::Postgres(p) => drop(sqlx::query(sql).execute(p).await.unwrap()),
        }
    }

    /// Two text columns of each row, `$1` bound to `arg`.
    pub async fn pairs(&self, sql: &str, arg: &str) -> Vec<(String, String)> {
        match self {
            StateDb::Sqlite(p) => sqlx::query_as(sql).bind(arg).fetch_all(p).await.unwrap(),
            StateDb::Postgres(p) => sqlx::query_as(sql).bind(arg).fetch_all(p).await.unwrap(),
        }
    }
}
