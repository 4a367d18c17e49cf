//! Services and subscriptions (SPEC §12.1): saved from complete listings,
//! counted missing when absent, closed past the grace, loaded per owner. A
//! pending row keeps what it had settled, its plan included: a plan change
//! in motion grants the new plan once it is active, not before.

use std::collections::{HashMap, HashSet};

use super::db::{on, on_pool, Row, Tx};
use super::logins::{bind_ids, distinct_runs, placeholders};
use super::{ReadStamp, Result, Store};
use crate::core::entitlements::{RawService, Service, ServiceState};
use crate::core::model::{content_hash, AccountKey, SourceKind};

/// Service rows written per transaction.
const ROW_BATCH: usize = 2_000;

/// A listed service, its owner resolved and its raw state mapped.
#[derive(Debug, Clone)]
pub struct ListedService {
    pub raw: RawService,
    pub owner_id: String,
    pub state: ServiceState,
}

impl ListedService {
    /// What a re-read compares: the raw row, its owner and its state.
    fn row_hash(&self) -> String {
        content_hash(&(&self.raw, &self.owner_id, self.state.as_str()))
    }
}

/// What the store knows of a stored service: its last row, whether it is
/// going missing, and whether it is still open (a closed one absent from a
/// listing needs nothing more).
struct KnownService {
    row_hash: String,
    missing_cycles: u32,
    open: bool,
}

impl Store {
    /// Records listed services, writing only rows that are new, changed or
    /// back after going missing (as accounts are). Only a `complete`
    /// listing (the whole source, every row readable) counts the services
    /// it lacks missing, and closes them past the grace; a targeted re-read
    /// or a listing with unreadable rows only updates what it names.
    /// `skipped` rows (invalid this read) keep what they had and are not
    /// counted missing.
    pub async fn save_services(
        &self,
        source: SourceKind,
        complete: bool,
        listed: &[ListedService],
        skipped: &HashSet<String>,
        grace: u32,
        read: ReadStamp,
    ) -> Result<()> {
        // A re-read of some services needs to know only those.
        let known = match complete {
            true => self.service_index(source).await?,
            false => {
                let ids: Vec<&str> = listed.iter().map(|s| s.raw.id.as_str()).collect();
                self.service_index_of(source, &ids).await?
            }
        };
        let grace = grace.max(1);
        // Rows in batches, as accounts' (`save_listing`): writing one again
        // is harmless; the missing counts move in one transaction after.
        for batch in listed.chunks(ROW_BATCH) {
            let rows = service_writes(batch, &known);
            if rows.is_empty() {
                continue;
            }
            let mut tx = self.write_tx().await?;
            let runs = distinct_runs(&rows, ROWS_PER_STATEMENT, |(s, _)| s.raw.id.as_str());
            for run in runs {
                upsert_services(&mut tx, source, run, read).await?;
            }
            tx.commit().await?;
        }
        let mut tx = self.write_tx().await?;
        if complete {
            let seen: HashSet<&str> = listed.iter().map(|s| s.raw.id.as_str()).collect();
            let absent = known
                .iter()
                .filter(|(id, k)| !seen.contains(id.as_str()) && !skipped.contains(*id) && k.open);
            for (id, _) in absent {
                count_missing(&mut tx, source, id, grace, read).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn service_index(&self, source: SourceKind) -> Result<HashMap<String, KnownService>> {
        let rows = on_pool!(self.db, |c| {
            sqlx::query(
            "SELECT id, row_hash, missing_cycles, state != 'closed' FROM services WHERE source = $1",
        )
        .bind(source.as_str())
        .fetch_all(c)
        .await.map(Row::all)
        })?;
        Ok(known_services(rows))
    }

    async fn service_index_of(
        &self,
        source: SourceKind,
        ids: &[&str],
    ) -> Result<HashMap<String, KnownService>> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT id, row_hash, missing_cycles, state != 'closed' FROM services
                 WHERE source = $1 AND id IN ({})",
                placeholders(2, chunk.len())
            );
            let rows = on_pool!(self.db, |c| {
                let q = sqlx::query(&sql).bind(source.as_str());
                bind_ids(chunk, q).fetch_all(c).await.map(Row::all)
            })?;
            out.extend(known_services(rows));
        }
        Ok(out)
    }

    /// Every stored service of a source by owner id, pending ones standing
    /// for the state they had before.
    pub async fn load_services(&self, source: SourceKind) -> Result<HashMap<String, Vec<Service>>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT id, owner_id, raw_json, state, settled FROM services WHERE source = $1",
        )
        .bind(source.as_str())
        .fetch_all(c)
        .await
        .map(Row::all))?;
        let mut out = HashMap::new();
        add_services(source, rows, &mut out);
        Ok(out)
    }

    /// The stored services of the accounts among `owners` (a targeted cycle's).
    pub async fn load_services_of(
        &self,
        source: SourceKind,
        owners: &[&str],
    ) -> Result<HashMap<String, Vec<Service>>> {
        let mut out = HashMap::new();
        for chunk in owners.chunks(500) {
            let sql = format!(
                "SELECT id, owner_id, raw_json, state, settled FROM {}
                 WHERE source = $1 AND owner_id IN ({})",
                by_owner(&self.db),
                placeholders(2, chunk.len())
            );
            let rows = on_pool!(self.db, |c| {
                let q = sqlx::query(&sql).bind(source.as_str());
                bind_ids(chunk, q).fetch_all(c).await.map(Row::all)
            })?;
            add_services(source, rows, &mut out);
        }
        Ok(out)
    }

    /// The raw rows of one account's services, by service id (`explain`).
    pub async fn raw_services_of(&self, owner: &AccountKey) -> Result<HashMap<String, RawService>> {
        let sql = format!(
            "SELECT id, raw_json, raw_status FROM {} WHERE source = $1 AND owner_id = $2",
            by_owner(&self.db)
        );
        let rows = on_pool!(self.db, |c| sqlx::query(&sql)
            .bind(owner.source.as_str())
            .bind(&owner.id)
            .fetch_all(c)
            .await
            .map(Row::all))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut raw: RawService =
                    serde_json::from_str(&r.get::<String, _>(1)).unwrap_or_default();
                raw.status = r.get(2);
                (r.get(0), raw)
            })
            .collect())
    }

    /// Services per source and settled state (`status`).
    pub async fn service_counts(
        &self,
    ) -> Result<std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>> {
        let rows = on_pool!(self.db, |c| {
            sqlx::query(
            "SELECT source, COALESCE(CASE WHEN state = 'pending' THEN settled END, state), COUNT(*)
             FROM services GROUP BY 1, 2",
        )
        .fetch_all(c)
        .await.map(Row::all)
        })?;
        let mut out: std::collections::BTreeMap<_, std::collections::BTreeMap<_, _>> =
            Default::default();
        for r in rows {
            let n = r.get::<i64, _>(2).max(0) as u64;
            out.entry(r.get(0)).or_default().insert(r.get(1), n);
        }
        Ok(out)
    }

    /// Services not closed: what an empty listing would contradict.
    pub async fn count_services(&self, source: SourceKind) -> Result<u64> {
        let n: i64 = on_pool!(self.db, |c| sqlx::query_scalar(
            "SELECT COUNT(*) FROM services WHERE source = $1 AND state != 'closed'",
        )
        .bind(source.as_str())
        .fetch_one(c)
        .await)?;
        Ok(n.max(0) as u64)
    }
}

/// Rows per statement (9 parameters each).
const ROWS_PER_STATEMENT: usize = 500;

/// The rows of a batch to write, with their hashes: new, changed, or back
/// after going missing.
fn service_writes<'a>(
    batch: &'a [ListedService],
    known: &HashMap<String, KnownService>,
) -> Vec<(&'a ListedService, String)> {
    let mut rows = vec![];
    for s in batch {
        let hash = s.row_hash();
        let same = known.get(&s.raw.id);
        if !same.is_some_and(|k| k.row_hash == hash && k.missing_cycles == 0) {
            rows.push((s, hash));
        }
    }
    rows
}

/// Listed services in one statement. A pending row keeps the owner and raw
/// row it settled with; a newer read (a later `seen_seq`) already stored is
/// never overwritten.
async fn upsert_services(
    tx: &mut Tx,
    source: SourceKind,
    rows: &[(&ListedService, String)],
    read: ReadStamp,
) -> Result<()> {
    on!(tx.conn(), |c| {
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO services (source, id, owner_id, raw_json, state, settled,
                missing_cycles, seen_seq, raw_status, row_hash) ",
        );
        q.push_values(rows, |mut row, (s, hash)| {
            let settled = (s.state != ServiceState::Pending).then(|| s.state.as_str());
            row.push_bind(source.as_str())
                .push_bind(s.raw.id.as_str())
                .push_bind(s.owner_id.as_str())
                .push_bind(serde_json::to_string(&s.raw).unwrap_or_default())
                .push_bind(s.state.as_str())
                .push_bind(settled)
                .push("0")
                .push_bind(read.seq)
                .push_bind(s.raw.status.as_deref())
                .push_bind(hash.as_str());
        });
        q.push(
            " ON CONFLICT (source, id) DO UPDATE SET
            owner_id = CASE WHEN excluded.state = 'pending' AND services.settled IS NOT NULL
                            THEN services.owner_id ELSE excluded.owner_id END,
            raw_json = CASE WHEN excluded.state = 'pending' AND services.settled IS NOT NULL
                            THEN services.raw_json ELSE excluded.raw_json END,
            state = excluded.state, missing_cycles = 0, seen_seq = excluded.seen_seq,
            raw_status = excluded.raw_status, row_hash = excluded.row_hash,
            settled = CASE WHEN excluded.state = 'pending' THEN services.settled
                           ELSE excluded.state END
         WHERE services.seen_seq <= excluded.seen_seq",
        );
        q.build().execute(c).await.map(drop)
    })?;
    Ok(())
}

/// Absent from a complete listing: one more missing cycle, unless a newer
/// read saw it; absent from `grace` listings, closed.
async fn count_missing(
    tx: &mut Tx,
    source: SourceKind,
    id: &str,
    grace: u32,
    read: ReadStamp,
) -> Result<()> {
    on!(tx.conn(), |c| sqlx::query(
        "UPDATE services SET missing_cycles = missing_cycles + 1,
            state = CASE WHEN missing_cycles + 1 >= $3 THEN 'closed' ELSE state END,
            settled = CASE WHEN missing_cycles + 1 >= $3 THEN 'closed' ELSE settled END
         WHERE source = $1 AND id = $2 AND seen_seq < $4",
    )
    .bind(source.as_str())
    .bind(id)
    .bind(i64::from(grace))
    .bind(read.seq)
    .execute(c)
    .await
    .map(drop))?;
    Ok(())
}

/// The services table, read by owner. SQLite (3.40, no statistics) picks
/// the primary key's `source = ?` over `services_by_owner` when the index
/// does not cover the query, a scan of half the table: 12 ms of a 25 ms
/// payment tick at 100k accounts, and the part of it that grew with them.
fn by_owner(db: &super::db::Db) -> &'static str {
    match db {
        super::db::Db::Sqlite(_) => "services INDEXED BY services_by_owner",
        super::db::Db::Postgres(_) => "services",
    }
}

/// Decodes `id, owner_id, raw_json, state, settled` rows into `out`, by owner.
fn add_services(source: SourceKind, rows: Vec<Row>, out: &mut HashMap<String, Vec<Service>>) {
    for r in rows {
        let raw: RawService = serde_json::from_str(&r.get::<String, _>(2)).unwrap_or_default();
        let state = ServiceState::parse(&r.get::<String, _>(3)).unwrap_or(ServiceState::Pending);
        let settled = r
            .get::<Option<String>, _>(4)
            .as_deref()
            .and_then(ServiceState::parse);
        let owner_id: String = r.get(1);
        out.entry(owner_id.clone()).or_default().push(Service {
            id: r.get(0),
            owner: AccountKey {
                source,
                id: owner_id,
            },
            plan_id: raw.plan_id,
            plan_name: raw.plan_name,
            state: state.settle(settled),
        });
    }
}

fn known_services(rows: Vec<Row>) -> HashMap<String, KnownService> {
    rows.into_iter()
        .map(|r| {
            let known = KnownService {
                row_hash: r.get(1),
                missing_cycles: r.get::<i64, _>(2).max(0) as u32,
                open: r.get(3),
            };
            (r.get(0), known)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::db::Db;

    /// A payment tick reads one owner's services: by the owner index, not
    /// by a walk of the source's half of the table (see `by_owner`).
    #[tokio::test]
    async fn an_owners_services_are_read_through_the_owner_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let Db::Sqlite(pool) = &store.db else {
            unreachable!("a SQLite store")
        };
        let sql = format!(
            "EXPLAIN QUERY PLAN SELECT id, owner_id, raw_json, state, settled FROM {}
             WHERE source = ?1 AND owner_id IN (?2)",
            by_owner(&store.db)
        );
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(&sql)
            .bind("billmanager")
            .bind("7")
            .fetch_all(pool)
            .await
            .unwrap();
        let detail = &plan[0].3;
        assert!(detail.contains("services_by_owner"), "{detail}");
    }

    fn listed(id: &str, owner: &str, plan: &str) -> ListedService {
        let raw = RawService {
            id: id.into(),
            owner_id: Some(owner.into()),
            plan_name: Some(plan.into()),
            status: Some("active".into()),
            ..Default::default()
        };
        ListedService {
            raw,
            owner_id: owner.into(),
            state: ServiceState::Active,
        }
    }

    /// Service rows go several to a statement: a listing longer than one
    /// statement lands whole, and a service listed twice keeps the later.
    #[tokio::test]
    async fn a_long_service_listing_with_a_row_listed_twice_lands_whole() {
        let kind = SourceKind::Activeplatform;
        let read = ReadStamp {
            seq: 1,
            at: chrono::Utc::now(),
        };
        for (store, _dir) in crate::store::testing::stores().await {
            let n = ROWS_PER_STATEMENT + 3;
            let mut rows: Vec<_> = (0..n)
                .map(|i| listed(&i.to_string(), "9", "basic"))
                .collect();
            rows.insert(6, listed("5", "9", "premium"));
            let none = HashSet::new();
            (store.save_services(kind, true, &rows, &none, 3, read))
                .await
                .unwrap();
            let stored = store
                .load_services(kind)
                .await
                .unwrap()
                .remove("9")
                .unwrap();
            assert_eq!(stored.len(), n);
            let five = stored.iter().find(|s| s.id == "5").unwrap();
            assert_eq!(five.plan_name.as_deref(), Some("premium"));
        }
    }
}
