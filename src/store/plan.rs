//! The desired state, the plan and the login conflicts: written in one
//! transaction before any push, read by `status` and `explain`.

use std::collections::{BTreeMap, HashSet};

use futures::TryStreamExt;

use super::db::{on, on_pool, on_write, Row, Tx};
use super::{account_key, decode_json, Result, Store};
use crate::core::desired::{Conflict, Desired, DesiredUser};
use crate::core::model::{AccountKey, UserState};
use crate::core::plan::{Op, Plan};

/// Whether a persisted op is waiting to be pushed or held for approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanState {
    Planned,
    Held,
}

impl PlanState {
    fn as_str(self) -> &'static str {
        match self {
            PlanState::Planned => "planned",
            PlanState::Held => "held",
        }
    }
}

/// One persisted op, as `status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRow {
    pub login: String,
    /// The SPEC §6a action: create, update, block or delete.
    pub action: String,
    pub state: PlanState,
}

/// A login's desired user, as last persisted.
#[derive(Debug, Clone)]
pub struct DesiredRow {
    pub owner: AccountKey,
    pub state: UserState,
    /// Names of the rules that matched.
    pub rules: Vec<String>,
}

/// A login that several accounts yield: the owner first, then the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictRow {
    pub login: String,
    pub sources: Vec<String>,
}

impl Store {
    /// Desired state, plan and conflicts, before any push: in transactions
    /// of `ROW_BATCH` rows, so a million-row plan never holds the store's
    /// write lock for minutes (a payment tick waits for none of it). Only
    /// desired rows that changed are written; the digest is sealed last,
    /// and only if no targeted plan wrote a desired row meanwhile.
    pub async fn persist_plan(
        &self,
        cycle_id: i64,
        desired: &Desired,
        plan: &Plan,
        status_blocked: &str,
    ) -> Result<()> {
        let digest = desired_digest(desired);
        let stored = read_digest(&self.db).await?;
        let seal = match stored.as_deref() == Some(digest.as_str()) {
            true => None,
            false => Some(self.write_delta(cycle_id, desired).await?),
        };
        self.write_plan(cycle_id, plan, status_blocked).await?;
        let mut tx = self.write_tx().await?;
        if let Some(pending) = &seal {
            seal_digest(&mut tx, pending, &digest).await?;
        }
        write_conflicts(&mut tx, &desired.conflicts).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A targeted cycle's plan: the desired rows and plan rows of its own
    /// logins only, beside whatever the listing lane persisted.
    pub async fn persist_targeted_plan(
        &self,
        cycle_id: i64,
        desired: &Desired,
        plan: &Plan,
        status_blocked: &str,
    ) -> Result<()> {
        let ops = plan.ops.iter().chain(&plan.held);
        let planned: Vec<_> = ops
            .filter_map(|op| desired.users.get_key_value(&op.login))
            .collect();
        let mut tx = self.write_tx().await?;
        if !planned.is_empty() {
            write_digest(&mut tx, None).await?;
        }
        // One transaction however many: a targeted plan is what it re-read.
        for batch in planned.chunks(ROW_BATCH) {
            write_desired(&mut tx, batch).await?;
        }
        let ops: Vec<_> = plan.ops.iter().map(|o| (o, PlanState::Planned)).collect();
        for batch in ops.chunks(ROW_BATCH) {
            replace_ops(&mut tx, cycle_id, batch, status_blocked).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A login's planned op is done: it leaves the pending list.
    pub async fn plan_done(&self, login: &str) -> Result<()> {
        on_write!(self, |c| sqlx::query(
            "DELETE FROM plan_ops WHERE login = $1 AND state = 'planned'"
        )
        .bind(login)
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    /// One cycle's planned op for a login leaves the pending list (a task
    /// superseded: the other lane's row for the login is its own).
    pub async fn plan_done_in(&self, login: &str, cycle_id: i64) -> Result<()> {
        on_write!(self, |c| sqlx::query(
            "DELETE FROM plan_ops WHERE login = $1 AND cycle_id = $2 AND state = 'planned'"
        )
        .bind(login)
        .bind(cycle_id)
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    /// The persisted plan, in order.
    pub async fn plan_rows(&self) -> Result<Vec<PlanRow>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT login, action, state FROM plan_ops ORDER BY seq"
        )
        .fetch_all(c)
        .await
        .map(Row::all))?;
        Ok(rows
            .into_iter()
            .map(|r| PlanRow {
                login: r.get(0),
                action: r.get(1),
                state: match r.get::<&str, _>(2) {
                    "held" => PlanState::Held,
                    _ => PlanState::Planned,
                },
            })
            .collect())
    }

    pub async fn desired_user(&self, login: &str) -> Result<Option<DesiredRow>> {
        let row = on_pool!(self.db, |c| sqlx::query(
            "SELECT source, account_id, state_json, rules FROM desired_users WHERE login = $1",
        )
        .bind(login)
        .fetch_optional(c)
        .await
        .map(Row::opt))?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(DesiredRow {
            owner: account_key(&r.get::<String, _>(0), r.get(1))?,
            state: decode_json(&r.get::<String, _>(2))?,
            rules: serde_json::from_str(&r.get::<String, _>(3)).unwrap_or_default(),
        }))
    }

    pub async fn conflicts(&self) -> Result<Vec<ConflictRow>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT login, sources FROM conflicts ORDER BY login"
        )
        .fetch_all(c)
        .await
        .map(Row::all))?;
        Ok(rows
            .into_iter()
            .map(|r| ConflictRow {
                login: r.get(0),
                sources: serde_json::from_str(&r.get::<String, _>(1)).unwrap_or_default(),
            })
            .collect())
    }
}

/// Rows per write transaction (and per statement) of a listing plan: a
/// million-row plan in one transaction held the write lock for minutes.
const ROW_BATCH: usize = 1_000;

impl Store {
    /// The desired rows brought to `desired`: changed ones written, those
    /// of logins nobody desires any more deleted, a batch per transaction.
    /// Returns the pending mark `seal_digest` turns into the digest.
    async fn write_delta(&self, cycle_id: i64, desired: &Desired) -> Result<String> {
        // The mark goes first: a targeted plan that writes a desired row
        // after it removes it, and the digest is then never sealed.
        let pending = format!("pending:{cycle_id}");
        let mut tx = self.write_tx().await?;
        write_digest(&mut tx, Some(&pending)).await?;
        tx.commit().await?;
        let (current, gone) = desired_delta(&self.db, desired).await?;
        let changed = desired.users.iter();
        let changed: Vec<_> = changed
            .filter(|(login, _)| !current.contains(login.as_str()))
            .collect();
        for batch in changed.chunks(ROW_BATCH) {
            let mut tx = self.write_tx().await?;
            write_desired(&mut tx, batch).await?;
            tx.commit().await?;
        }
        for batch in gone.chunks(ROW_BATCH) {
            let mut tx = self.write_tx().await?;
            delete_logins(&mut tx, "desired_users", batch).await?;
            tx.commit().await?;
        }
        Ok(pending)
    }

    /// A listing cycle's plan replaces the listing lane's rows, and the
    /// rows of the logins it plans; a targeted cycle's other rows stay (its
    /// push may be running now).
    ///
    /// The new rows go in before the old ones leave: while it is written,
    /// `approve` sees the logins the plan before held (and those of this
    /// one written so far), never none of them.
    async fn write_plan(&self, cycle_id: i64, plan: &Plan, status_blocked: &str) -> Result<()> {
        let rows: Vec<_> = (plan.ops.iter().map(|o| (o, PlanState::Planned)))
            .chain(plan.held.iter().map(|o| (o, PlanState::Held)))
            .collect();
        for batch in rows.chunks(ROW_BATCH) {
            let mut tx = self.write_tx().await?;
            replace_ops(&mut tx, cycle_id, batch, status_blocked).await?;
            tx.commit().await?;
        }
        while self.delete_listing_ops(cycle_id).await? > 0 {}
        Ok(())
    }

    /// Up to `ROW_BATCH` plan rows of earlier listing cycles gone; how many.
    async fn delete_listing_ops(&self, cycle_id: i64) -> Result<u64> {
        let deleted = on_write!(self, |c| sqlx::query(
            "DELETE FROM plan_ops WHERE seq IN (SELECT seq FROM plan_ops
                WHERE cycle_id <> $2 AND cycle_id IN
                    (SELECT id FROM cycles WHERE kind IN ('incremental', 'full')) LIMIT $1)",
        )
        .bind(ROW_BATCH as i64)
        .bind(cycle_id)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(deleted)
    }
}

/// Desired rows, inserted or replaced in one statement (at most
/// `ROW_BATCH`: a statement's parameters are bounded).
async fn write_desired(tx: &mut Tx, users: &[(&String, &DesiredUser)]) -> Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    on!(tx.conn(), |c| {
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO desired_users (login, source, account_id, state_json, hash, rules) ",
        );
        q.push_values(users, |mut row, (login, d)| {
            row.push_bind(login.as_str())
                .push_bind(d.owner.source.as_str())
                .push_bind(d.owner.id.as_str())
                .push_bind(serde_json::to_string(&d.state).unwrap_or_default())
                .push_bind(d.hash.as_str())
                .push_bind(serde_json::to_string(&d.rules).unwrap_or_default());
        });
        q.push(
            " ON CONFLICT (login) DO UPDATE SET source = excluded.source,
                account_id = excluded.account_id, state_json = excluded.state_json,
                hash = excluded.hash, rules = excluded.rules",
        );
        q.build().execute(c).await.map(drop)
    })?;
    Ok(())
}

/// The rows of these logins gone from `table` (a name of ours, never input).
async fn delete_logins<S: AsRef<str>>(tx: &mut Tx, table: &str, logins: &[S]) -> Result<()> {
    if logins.is_empty() {
        return Ok(());
    }
    on!(tx.conn(), |c| {
        let mut q = sqlx::QueryBuilder::new(format!("DELETE FROM {table} WHERE login IN ("));
        let mut list = q.separated(", ");
        for login in logins {
            list.push_bind(login.as_ref());
        }
        q.push(")");
        q.build().execute(c).await.map(drop)
    })?;
    Ok(())
}

/// The meta key of `desired_digest`: set by the listing cycle that wrote
/// the desired rows whole, voided by any writer of some of them (a
/// targeted plan, a rehash), so that it always describes the table.
pub(super) const DESIRED_DIGEST: &str = "desired_digest";

/// One digest of every desired login and its hash, the very pairs the
/// delta compares: equal to the stored one, the delta would write nothing
/// and delete nothing, and a no-op cycle need not read 100k rows to learn it.
fn desired_digest(desired: &Desired) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (login, d) in &desired.users {
        h.update(login.as_bytes());
        h.update([0]);
        h.update(d.hash.as_bytes());
        h.update([b'\n']);
    }
    hex::encode(h.finalize())
}

async fn read_digest(db: &super::db::Db) -> Result<Option<String>> {
    Ok(on_pool!(db, |c| sqlx::query_scalar(
        "SELECT value FROM meta WHERE key = $1"
    )
    .bind(DESIRED_DIGEST)
    .fetch_optional(c)
    .await)?)
}

/// The digest in place of the pending mark, if the mark is still there.
async fn seal_digest(tx: &mut Tx, pending: &str, digest: &str) -> Result<()> {
    on!(tx.conn(), |c| sqlx::query(
        "UPDATE meta SET value = $3 WHERE key = $1 AND value = $2"
    )
    .bind(DESIRED_DIGEST)
    .bind(pending)
    .bind(digest)
    .execute(c)
    .await
    .map(drop))?;
    Ok(())
}

/// Sets the digest, or voids it (`None`). Voiding writes a value rather
/// than deleting the row: on PostgreSQL a DELETE of an absent row takes no
/// lock, and a listing's pending mark written beside it would survive it.
pub(super) async fn write_digest(tx: &mut Tx, digest: Option<&str>) -> Result<()> {
    on!(tx.conn(), |c| sqlx::query(
        "INSERT INTO meta (key, value) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )
    .bind(DESIRED_DIGEST)
    .bind(digest.unwrap_or(VOID))
    .execute(c)
    .await
    .map(drop))?;
    Ok(())
}

/// The digest's value while it describes no table.
const VOID: &str = "void";

/// Stored desired rows that are current, and logins nobody desires:
/// streamed, so a no-op cycle holds no copy of 100k rows.
async fn desired_delta<'d>(
    db: &super::db::Db,
    desired: &'d Desired,
) -> Result<(HashSet<&'d str>, Vec<String>)> {
    let mut current = HashSet::new();
    let mut gone = vec![];
    on_pool!(db, |c| {
        let mut rows = sqlx::query("SELECT login, hash FROM desired_users").fetch(c);
        while let Some(r) = rows.try_next().await? {
            let r = Row::from(r);
            let login: &str = r.get(0);
            match desired.users.get_key_value(login) {
                Some((key, d)) if d.hash == r.get::<&str, _>(1) => {
                    current.insert(key.as_str());
                }
                Some(_) => {}
                None => gone.push(login.to_string()),
            }
        }
    });
    Ok((current, gone))
}

/// Plan rows in place of any other row of their logins (at most
/// `ROW_BATCH` of them: one statement each).
async fn replace_ops(
    tx: &mut Tx,
    cycle_id: i64,
    ops: &[(&Op, PlanState)],
    status_blocked: &str,
) -> Result<()> {
    let logins: Vec<&str> = ops.iter().map(|(op, _)| op.login.as_str()).collect();
    delete_logins(tx, "plan_ops", &logins).await?;
    insert_ops(tx, cycle_id, ops, status_blocked).await
}

/// Plan rows, inserted in one statement.
async fn insert_ops(
    tx: &mut Tx,
    cycle_id: i64,
    ops: &[(&Op, PlanState)],
    status_blocked: &str,
) -> Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    on!(tx.conn(), |c| {
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO plan_ops (cycle_id, login, action, payload, deprovision, state) ",
        );
        q.push_values(ops, |mut row, (op, state)| {
            row.push_bind(cycle_id)
                .push_bind(op.login.as_str())
                .push_bind(op.label(status_blocked))
                .push_bind(serde_json::to_string(op).unwrap_or_default())
                .push_bind(op.deprovision)
                .push_bind(state.as_str());
        });
        q.build().execute(c).await.map(drop)
    })?;
    Ok(())
}

async fn write_conflicts(tx: &mut Tx, conflicts: &[Conflict]) -> Result<()> {
    on!(tx.conn(), |c| sqlx::query("DELETE FROM conflicts")
        .execute(c)
        .await
        .map(drop))?;
    let mut by_login: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for c in conflicts {
        by_login
            .entry(c.login.as_str())
            .or_insert_with(|| vec![c.winner.to_string()])
            .push(c.loser.to_string());
    }
    let rows: Vec<_> = by_login.into_iter().collect();
    for batch in rows.chunks(ROW_BATCH) {
        on!(tx.conn(), |c| {
            let mut q = sqlx::QueryBuilder::new("INSERT INTO conflicts (login, sources) ");
            q.push_values(batch, |mut row, (login, sources)| {
                row.push_bind(*login)
                    .push_bind(serde_json::to_string(sources).unwrap_or_default());
            });
            q.build().execute(c).await.map(drop)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::cycle::CycleKind;
    use crate::core::model::SourceKind;
    use crate::core::plan::Action;
    use crate::store::testing::stores;

    fn create(login: &str) -> Op {
        Op {
            login: login.into(),
            owner: AccountKey {
                source: SourceKind::Activeplatform,
                id: "1".into(),
            },
            action: Action::Create,
            target: UserState {
                user_type: "b2c".into(),
                status: "active".into(),
                billing_id: "activeplatform-1".into(),
                properties: vec![],
                permissions: Default::default(),
                gone: false,
                cameras: None,
            },
            deprovision: false,
            cameras: None,
        }
    }

    fn plan_of(login: &str) -> Plan {
        Plan {
            ops: vec![create(login)],
            ..Default::default()
        }
    }

    async fn listing(store: &Store) -> i64 {
        let now = chrono::Utc::now();
        store
            .start_cycle(CycleKind::Incremental, now)
            .await
            .unwrap()
    }

    async fn logins(store: &Store) -> Vec<String> {
        let rows = store.plan_rows().await.unwrap();
        rows.into_iter().map(|r| r.login).collect()
    }

    /// Issue 17: a listing cycle's plan erased every plan row, the fast
    /// lane's too, while its push may still be running.
    #[tokio::test]
    async fn a_listing_plan_leaves_the_fast_lanes_rows() {
        for (store, _dir) in stores().await {
            let now = chrono::Utc::now();
            let fast = store.start_cycle(CycleKind::Payments, now).await.unwrap();
            let desired = Desired::default();
            let paid = plan_of("paid@x");
            (store.persist_targeted_plan(fast, &desired, &paid, "blocked"))
                .await
                .unwrap();
            for _ in 0..2 {
                let id = listing(&store).await;
                let plan = plan_of("listed@x");
                (store.persist_plan(id, &desired, &plan, "blocked"))
                    .await
                    .unwrap();
            }
            let want = ["paid@x", "listed@x"];
            assert_eq!(
                logins(&store).await,
                want,
                "one row each, the fast lane's kept"
            );
        }
    }

    fn desired_of(logins: &[(&str, &str)]) -> Desired {
        let mut desired = Desired::default();
        for (login, hash) in logins {
            let op = create(login);
            desired.users.insert(
                login.to_string(),
                DesiredUser {
                    login: login.to_string(),
                    owner: op.owner,
                    state: op.target,
                    hash: hash.to_string(),
                    rules: Default::default(),
                    writeback_seen: None,
                },
            );
        }
        desired
    }

    async fn hashes(store: &Store) -> Vec<(String, String)> {
        let rows: Result<Vec<Row>> = async {
            Ok(on_pool!(store.db, |c| sqlx::query(
                "SELECT login, hash FROM desired_users ORDER BY login"
            )
            .fetch_all(c)
            .await
            .map(Row::all))?)
        }
        .await;
        rows.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// A listing cycle whose desired state matches the digest it wrote
    /// last skips the delta; a targeted plan that wrote a desired row in
    /// between voids the digest, so the next listing brings that row back
    /// to its own state (else the table would keep the targeted row while
    /// the digest claims the listing's).
    #[tokio::test]
    async fn the_desired_digest_skips_only_an_unchanged_table() {
        for (store, _dir) in stores().await {
            let now = chrono::Utc::now();
            let listed = desired_of(&[("a@x", "h1"), ("b@x", "h2")]);
            let empty = Plan::default();
            for _ in 0..2 {
                let id = listing(&store).await;
                (store.persist_plan(id, &listed, &empty, "blocked"))
                    .await
                    .unwrap();
            }
            let fast = store.start_cycle(CycleKind::Payments, now).await.unwrap();
            let paid = desired_of(&[("a@x", "h9")]);
            (store.persist_targeted_plan(fast, &paid, &plan_of("a@x"), "blocked"))
                .await
                .unwrap();
            assert_eq!(hashes(&store).await[0].1, "h9");
            let id = listing(&store).await;
            (store.persist_plan(id, &listed, &empty, "blocked"))
                .await
                .unwrap();
            let want = [("a@x", "h1"), ("b@x", "h2")].map(|(l, h)| (l.to_string(), h.to_string()));
            assert_eq!(hashes(&store).await, want);
            // A login nobody desires any more goes, digest or not.
            let fewer = desired_of(&[("b@x", "h2")]);
            let id = listing(&store).await;
            (store.persist_plan(id, &fewer, &empty, "blocked"))
                .await
                .unwrap();
            assert_eq!(hashes(&store).await, want[1..].to_vec());
        }
    }

    /// The delta is written in transactions of its own: a targeted plan
    /// that writes a desired row while a listing's delta is being written
    /// leaves the digest unsealed, so the next listing does not skip a
    /// table that no longer matches it.
    #[tokio::test]
    async fn a_targeted_write_during_the_delta_leaves_the_digest_unsealed() {
        for (store, _dir) in stores().await {
            let now = chrono::Utc::now();
            let listed = desired_of(&[("a@x", "h1"), ("b@x", "h2")]);
            let id = listing(&store).await;
            let pending = store.write_delta(id, &listed).await.unwrap();
            let fast = store.start_cycle(CycleKind::Payments, now).await.unwrap();
            let paid = desired_of(&[("a@x", "h9")]);
            (store.persist_targeted_plan(fast, &paid, &plan_of("a@x"), "blocked"))
                .await
                .unwrap();
            let mut tx = store.write_tx().await.unwrap();
            let digest = desired_digest(&listed);
            seal_digest(&mut tx, &pending, &digest).await.unwrap();
            tx.commit().await.unwrap();
            assert_eq!(read_digest(&store.db).await.unwrap().as_deref(), Some(VOID));
            let id = listing(&store).await;
            (store.persist_plan(id, &listed, &Plan::default(), "blocked"))
                .await
                .unwrap();
            let want = [("a@x", "h1"), ("b@x", "h2")].map(|(l, h)| (l.to_string(), h.to_string()));
            assert_eq!(hashes(&store).await, want, "the listing's rows back");
            assert_eq!(read_digest(&store.db).await.unwrap(), Some(digest));
        }
    }

    /// A plan of several batches is written whole, and the next listing's
    /// plan replaces all of it.
    #[tokio::test]
    async fn a_plan_of_many_batches_is_written_and_replaced_whole() {
        for (store, _dir) in stores().await {
            let many: Vec<String> = (0..2 * ROW_BATCH + 7)
                .map(|i| format!("u{i:05}@x"))
                .collect();
            let pairs: Vec<(&str, &str)> = many.iter().map(|l| (l.as_str(), "h")).collect();
            let desired = desired_of(&pairs);
            let plan = Plan {
                ops: many.iter().map(|l| create(l)).collect(),
                ..Default::default()
            };
            let id = listing(&store).await;
            (store.persist_plan(id, &desired, &plan, "blocked"))
                .await
                .unwrap();
            assert_eq!(logins(&store).await, many);
            assert_eq!(hashes(&store).await.len(), many.len());
            let few = desired_of(&pairs[..3]);
            let id = listing(&store).await;
            (store.persist_plan(id, &few, &plan_of(&many[1]), "blocked"))
                .await
                .unwrap();
            assert_eq!(logins(&store).await, [many[1].clone()]);
            assert_eq!(hashes(&store).await.len(), 3);
        }
    }
}
