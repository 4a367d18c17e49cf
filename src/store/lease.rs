//! The leader lease (SPEC §13): one row holding the holder, its epoch and
//! the expiry, all in database time. Claimed and renewed by one statement;
//! a node takes an expired lease by raising the epoch. No advisory lock
//! and nothing kept across transactions, so a transaction-pooling proxy
//! may sit in front. Write transactions check the epoch (`Store::fence`).

use super::db::{on_pool, Backend, Row};
use super::{Result, Store};

/// The lease as the database holds it, with the database's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub holder: String,
    pub epoch: i64,
    pub since_ms: i64,
    pub expires_ms: i64,
    /// The database's time when this was read.
    pub now_ms: i64,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This holder holds the lease now (renewed, or taken at a new epoch).
    Held(LeaseRow),
    /// Another holder does, and it has not expired.
    Other(LeaseRow),
}

const NAME: &str = "leader";

impl Backend {
    /// SQL for the database's clock, in Unix milliseconds.
    fn now_ms(self) -> &'static str {
        match self {
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }
}

impl Store {
    /// Renews the lease when `holder` holds it, takes it (epoch + 1) when
    /// it is free or expired, for `lease_ms` from now by database time.
    pub async fn claim_lease(&self, holder: &str, lease_ms: i64) -> Result<Claim> {
        let now = self.backend().now_ms();
        let sql = format!(
            "INSERT INTO lease (name, holder, epoch, since_ms, expires_ms)
             VALUES ($1, $2, 1, {now}, {now} + $3)
             ON CONFLICT (name) DO UPDATE SET
                epoch = CASE WHEN lease.holder = excluded.holder THEN lease.epoch
                             ELSE lease.epoch + 1 END,
                since_ms = CASE WHEN lease.holder = excluded.holder THEN lease.since_ms
                                ELSE excluded.since_ms END,
                holder = excluded.holder,
                expires_ms = excluded.expires_ms
             WHERE lease.holder = excluded.holder OR lease.expires_ms <= {now}
             RETURNING holder, epoch, since_ms, expires_ms, {now}"
        );
        let row = on_pool!(self.db, |c| sqlx::query(&sql)
            .bind(NAME)
            .bind(holder)
            .bind(lease_ms)
            .fetch_optional(c)
            .await
            .map(Row::opt))?;
        match row {
            Some(r) => Ok(Claim::Held(lease_row(&r))),
            None => match self.lease().await? {
                Some(other) => Ok(Claim::Other(other)),
                // Deleted in between: nobody holds it; the next claim takes it.
                None => Box::pin(self.claim_lease(holder, lease_ms)).await,
            },
        }
    }

    /// The lease as it stands, if anyone ever held it.
    pub async fn lease(&self) -> Result<Option<LeaseRow>> {
        let now = self.backend().now_ms();
        let sql =
            format!("SELECT holder, epoch, since_ms, expires_ms, {now} FROM lease WHERE name = $1");
        let row = on_pool!(self.db, |c| sqlx::query(&sql)
            .bind(NAME)
            .fetch_optional(c)
            .await
            .map(Row::opt))?;
        Ok(row.as_ref().map(lease_row))
    }

    /// Ends the lease at once, if `holder` still holds it at `epoch` (a
    /// clean stop): a standby need not wait for the expiry.
    pub async fn release_lease(&self, holder: &str, epoch: i64) -> Result<()> {
        let now = self.backend().now_ms();
        let sql = format!(
            "UPDATE lease SET expires_ms = {now} WHERE name = $1 AND holder = $2 AND epoch = $3"
        );
        on_pool!(self.db, |c| sqlx::query(&sql)
            .bind(NAME)
            .bind(holder)
            .bind(epoch)
            .execute(c)
            .await
            .map(drop))?;
        Ok(())
    }
}

fn lease_row(r: &Row) -> LeaseRow {
    LeaseRow {
        holder: r.get(0),
        epoch: r.get(1),
        since_ms: r.get(2),
        expires_ms: r.get(3),
        now_ms: r.get(4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    /// Two handles on one fresh store of each backend, as two nodes hold.
    async fn two_nodes() -> Vec<(Store, Store, Option<tempfile::TempDir>)> {
        let url = billsync_emulators::postgres::fresh_database();
        let bound = std::time::Duration::from_secs(10);
        let pg = || Store::open_postgres(&url, bound);
        let (a, b) = (pg().await.unwrap(), pg().await.unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let sqlite = (
            Store::open(&path).await.unwrap(),
            Store::open(&path).await.unwrap(),
        );
        vec![(a, b, None), (sqlite.0, sqlite.1, Some(dir))]
    }

    fn held(c: Claim) -> LeaseRow {
        match c {
            Claim::Held(r) => r,
            Claim::Other(r) => panic!("not held: {r:?}"),
        }
    }

    #[tokio::test]
    async fn one_holder_until_it_expires_then_a_new_epoch() {
        for (a, b, _dir) in two_nodes().await {
            let first = held(a.claim_lease("n1/aaa", 60_000).await.unwrap());
            assert_eq!(first.epoch, 1);
            let again = held(a.claim_lease("n1/aaa", 60_000).await.unwrap());
            assert_eq!(
                (again.epoch, again.since_ms),
                (1, first.since_ms),
                "a renewal"
            );
            assert!(again.expires_ms >= first.expires_ms);
            // The same node restarted draws a new id: it waits like anyone.
            for other in ["n2/bbb", "n1/ccc"] {
                match b.claim_lease(other, 60_000).await.unwrap() {
                    Claim::Other(r) => assert_eq!((r.holder.as_str(), r.epoch), ("n1/aaa", 1)),
                    Claim::Held(r) => panic!("{other} took a live lease: {r:?}"),
                }
            }
            // Expired (renewed for no time at all): taken at the next epoch.
            held(a.claim_lease("n1/aaa", 0).await.unwrap());
            let taken = held(b.claim_lease("n2/bbb", 60_000).await.unwrap());
            assert_eq!(taken.epoch, 2);
            match a.claim_lease("n1/aaa", 60_000).await.unwrap() {
                Claim::Other(r) => assert_eq!(r.holder, "n2/bbb"),
                Claim::Held(r) => panic!("the old holder took it back: {r:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_released_lease_is_taken_at_once() {
        for (a, b, _dir) in two_nodes().await {
            let mine = held(a.claim_lease("n1/aaa", 60_000).await.unwrap());
            a.release_lease("n2/bbb", mine.epoch).await.unwrap();
            assert!(matches!(
                b.claim_lease("n2/bbb", 60_000).await.unwrap(),
                Claim::Other(_)
            ));
            a.release_lease("n1/aaa", mine.epoch).await.unwrap();
            assert_eq!(
                held(b.claim_lease("n2/bbb", 60_000).await.unwrap()).epoch,
                2
            );
        }
    }

    /// The old leader's first write after a takeover fails on the epoch;
    /// the new leader's succeeds.
    #[tokio::test]
    async fn a_write_as_an_old_epoch_fails() {
        let (a, b, _dir) = two_nodes().await.swap_remove(0);
        let mine = held(a.claim_lease("n1/aaa", 0).await.unwrap());
        a.fence(mine.epoch);
        a.set_meta("probe", "a").await.unwrap();
        let theirs = held(b.claim_lease("n2/bbb", 60_000).await.unwrap());
        b.fence(theirs.epoch);
        match a.set_meta("probe", "stale").await {
            Err(StoreError::Fenced { mine: 1, now: 2 }) => {}
            other => panic!("the old leader wrote: {other:?}"),
        }
        b.set_meta("probe", "b").await.unwrap();
        assert_eq!(b.meta("probe").await.unwrap().as_deref(), Some("b"));
    }
}
