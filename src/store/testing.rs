//! Store tests run on both backends: one fresh store of each.

use super::Store;

/// A fresh PostgreSQL database and a fresh SQLite file (its directory
/// lives as long as the pair).
pub(super) async fn stores() -> Vec<(Store, Option<tempfile::TempDir>)> {
    let url = billsync_emulators::postgres::fresh_database();
    let pg = Store::open_postgres(&url, std::time::Duration::from_secs(10));
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open(&dir.path().join("state.db")).await.unwrap();
    vec![(pg.await.unwrap(), None), (sqlite, Some(dir))]
}
