//! The leader lease (SPEC §13): one row holding the holder, its epoch and
//! the expiry, all in database time. Claimed and renewed by one short
//! transaction; a node takes an expired lease by raising the epoch (see
//! ARCHITECTURE "The lease" for its row locks). No advisory lock
//! and nothing kept across transactions, so a transaction-pooling proxy
//! may sit in front. Write transactions check the epoch (`Store::fence`).

use super::db::{on, on_pool, Backend, Row, Tx};
use super::{Result, Store, StoreError};

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

    /// The row lock a takeover reads the lease with. Writers hold the row
    /// `FOR KEY SHARE` (`Store::write_tx`): this waits for them, a renewal
    /// (an update of no key) does not. SQLite has one writer at a time.
    fn for_update(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => "FOR UPDATE",
        }
    }
}

impl Store {
    /// Renews the lease when `holder` holds it and it has not expired;
    /// takes it at the next epoch when it is free or expired (its own
    /// expired lease too: a new term); for `lease_ms` from now by database
    /// time. A standby only reads: it locks the row only to take it.
    pub async fn claim_lease(&self, holder: &str, lease_ms: i64) -> Result<Claim> {
        let mut tx = self.db.begin(true).await?;
        let claim = self.claim_in(&mut tx, holder, lease_ms).await?;
        tx.commit().await?;
        Ok(claim)
    }

    async fn claim_in(&self, tx: &mut Tx, holder: &str, lease_ms: i64) -> Result<Claim> {
        let Some(row) = self.read_lease(tx, "").await? else {
            return self.insert_lease(tx, holder, lease_ms).await;
        };
        let live = row.expires_ms > row.now_ms;
        if live && row.holder != holder {
            return Ok(Claim::Other(row));
        }
        if live {
            if let Some(r) = self.renew_lease(tx, &row, lease_ms).await? {
                return Ok(Claim::Held(r));
            }
        }
        // Expired (or it expired just now): lock it, which waits for the
        // old epoch's writes to end, but not for longer than a renewal
        // may take; then look again.
        if self.backend() == Backend::Postgres {
            let wait = format!("SET LOCAL lock_timeout = {}", (lease_ms / 4).max(1));
            on!(tx.conn(), |c| sqlx::query(&wait).execute(c).await.map(drop))?;
        }
        let row = self.read_lease(tx, self.backend().for_update()).await?;
        let row = row.ok_or_else(|| StoreError::Decode("the lease row vanished".into()))?;
        if row.expires_ms > row.now_ms && row.holder != holder {
            return Ok(Claim::Other(row));
        }
        self.take_lease(tx, holder, lease_ms).await.map(Claim::Held)
    }

    async fn read_lease(&self, tx: &mut Tx, lock: &str) -> Result<Option<LeaseRow>> {
        let now = self.backend().now_ms();
        let sql = format!(
            "SELECT holder, epoch, since_ms, expires_ms, {now} FROM lease WHERE name = $1 {lock}"
        );
        let row = on!(tx.conn(), |c| sqlx::query(&sql)
            .bind(NAME)
            .fetch_optional(c)
            .await
            .map(Row::opt))?;
        Ok(row.as_ref().map(lease_row))
    }

    /// The first lease ever; if another node's came first, that one.
    async fn insert_lease(&self, tx: &mut Tx, holder: &str, lease_ms: i64) -> Result<Claim> {
        let now = self.backend().now_ms();
        let sql = format!(
            "INSERT INTO lease (name, holder, epoch, since_ms, expires_ms)
             VALUES ($1, $2, 1, {now}, {now} + $3)
             ON CONFLICT (name) DO NOTHING
             RETURNING holder, epoch, since_ms, expires_ms, {now}"
        );
        let row = on!(tx.conn(), |c| sqlx::query(&sql)
            .bind(NAME)
            .bind(holder)
            .bind(lease_ms)
            .fetch_optional(c)
            .await
            .map(Row::opt))?;
        match row {
            Some(r) => Ok(Claim::Held(lease_row(&r))),
            None => match self.read_lease(tx, "").await? {
                Some(other) => Ok(Claim::Other(other)),
                None => Err(StoreError::Decode("the lease row vanished".into())),
            },
        }
    }

    /// Extends `row`'s term if it is still live and unchanged.
    async fn renew_lease(
        &self,
        tx: &mut Tx,
        row: &LeaseRow,
        lease_ms: i64,
    ) -> Result<Option<LeaseRow>> {
        let now = self.backend().now_ms();
        let sql = format!(
            "UPDATE lease SET expires_ms = {now} + $4
             WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_ms > {now}
             RETURNING holder, epoch, since_ms, expires_ms, {now}"
        );
        let row = on!(tx.conn(), |c| sqlx::query(&sql)
            .bind(NAME)
            .bind(&row.holder)
            .bind(row.epoch)
            .bind(lease_ms)
            .fetch_optional(c)
            .await
            .map(Row::opt))?;
        Ok(row.as_ref().map(lease_row))
    }

    /// A new term for `holder` at the next epoch (the row is locked).
    async fn take_lease(&self, tx: &mut Tx, holder: &str, lease_ms: i64) -> Result<LeaseRow> {
        let now = self.backend().now_ms();
        let sql = format!(
            "UPDATE lease SET holder = $2, epoch = epoch + 1,
                since_ms = {now}, expires_ms = {now} + $3
             WHERE name = $1
             RETURNING holder, epoch, since_ms, expires_ms, {now}"
        );
        let row = on!(tx.conn(), |c| sqlx::query(&sql)
            .bind(NAME)
            .bind(holder)
            .bind(lease_ms)
            .fetch_one(c)
            .await
            .map(Row::from))?;
        Ok(lease_row(&row))
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
            // Its own lease, expired: a new term, so writes of the old one fail.
            held(b.claim_lease("n2/bbb", 0).await.unwrap());
            let again = held(b.claim_lease("n2/bbb", 60_000).await.unwrap());
            assert_eq!((again.holder.as_str(), again.epoch), ("n2/bbb", 3));
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

    /// The lease row under load: a renewal never waits for the leader's
    /// own open writes (it would lose the lease behind a slow one), while
    /// a takeover waits for them, so no write of the old epoch commits
    /// after the new epoch exists.
    #[tokio::test]
    async fn a_renewal_passes_open_writes_and_a_takeover_waits_for_them() {
        let (a, b, _dir) = two_nodes().await.swap_remove(0);
        let mine = held(a.claim_lease("n1/aaa", 60_000).await.unwrap());
        a.fence(mine.epoch);
        let open = a.write_tx().await.unwrap();
        let renewal = b.claim_lease("n1/aaa", 0);
        let renewed = tokio::time::timeout(std::time::Duration::from_secs(5), renewal).await;
        assert_eq!(held(renewed.expect("waited for a write").unwrap()).epoch, 1);
        // Expired now; the takeover must wait for the open write.
        let takeover = tokio::spawn(async move { b.claim_lease("n2/bbb", 60_000).await });
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(!takeover.is_finished(), "took over past an open write");
        open.commit().await.unwrap();
        assert_eq!(held(takeover.await.unwrap().unwrap()).epoch, 2);
        assert!(matches!(
            a.set_meta("probe", "stale").await,
            Err(StoreError::Fenced { mine: 1, now: 2 })
        ));
    }
}
