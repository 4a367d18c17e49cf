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
    /// Desired state, plan and conflicts in one transaction, before any push.
    /// Only desired rows that changed are written.
    pub async fn persist_plan(
        &self,
        cycle_id: i64,
        desired: &Desired,
        plan: &Plan,
        status_blocked: &str,
    ) -> Result<()> {
        // The delta is read inside the write transaction: the fast lane may
        // write desired rows between a read outside it and the write.
        let mut tx = self.write_tx().await?;
        let digest = desired_digest(desired);
        if read_digest(&mut tx).await?.as_deref() != Some(digest.as_str()) {
            write_delta(&mut tx, desired).await?;
            write_digest(&mut tx, Some(&digest)).await?;
        }
        write_plan(&mut tx, cycle_id, plan, status_blocked).await?;
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
        write_desired(&mut tx, planned.into_iter()).await?;
        for op in &plan.ops {
            on!(tx.conn(), |c| sqlx::query(
                "DELETE FROM plan_ops WHERE login = $1"
            )
            .bind(&op.login)
            .execute(c)
            .await
            .map(drop))?;
            insert_op(&mut tx, cycle_id, op, PlanState::Planned, status_blocked).await?;
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

async fn write_desired<'d>(
    tx: &mut Tx,
    users: impl Iterator<Item = (&'d String, &'d DesiredUser)>,
) -> Result<()> {
    for (login, d) in users {
        on!(tx.conn(), |c| sqlx::query(
            "INSERT INTO desired_users (login, source, account_id, state_json, hash, rules)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (login) DO UPDATE SET source = excluded.source,
                account_id = excluded.account_id, state_json = excluded.state_json,
                hash = excluded.hash, rules = excluded.rules",
        )
        .bind(login)
        .bind(d.owner.source.as_str())
        .bind(&d.owner.id)
        .bind(serde_json::to_string(&d.state).unwrap_or_default())
        .bind(&d.hash)
        .bind(serde_json::to_string(&d.rules).unwrap_or_default())
        .execute(c)
        .await
        .map(drop))?;
    }
    Ok(())
}

/// The meta key of `desired_digest`: set by the listing cycle that wrote
/// the desired rows whole, removed by any writer of some of them (a
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

async fn read_digest(tx: &mut Tx) -> Result<Option<String>> {
    Ok(on!(tx.conn(), |c| sqlx::query_scalar(
        "SELECT value FROM meta WHERE key = $1"
    )
    .bind(DESIRED_DIGEST)
    .fetch_optional(c)
    .await)?)
}

/// Sets the digest, or removes it (`None`). Each statement binds exactly
/// its parameters: PostgreSQL prepares a statement with as many as were
/// bound, and sqlx caches it by its text for every later use of that text.
pub(super) async fn write_digest(tx: &mut Tx, digest: Option<&str>) -> Result<()> {
    let Some(digest) = digest else {
        on!(tx.conn(), |c| sqlx::query(
            "DELETE FROM meta WHERE key = $1"
        )
        .bind(DESIRED_DIGEST)
        .execute(c)
        .await
        .map(drop))?;
        return Ok(());
    };
    on!(tx.conn(), |c| sqlx::query(
        "INSERT INTO meta (key, value) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )
    .bind(DESIRED_DIGEST)
    .bind(digest)
    .execute(c)
    .await
    .map(drop))?;
    Ok(())
}

/// The desired rows brought to `desired`: changed ones written, those of
/// logins nobody desires any more deleted.
async fn write_delta(tx: &mut Tx, desired: &Desired) -> Result<()> {
    let (current, gone) = desired_delta(tx, desired).await?;
    let changed = desired.users.iter();
    let changed = changed.filter(|(login, _)| !current.contains(login.as_str()));
    write_desired(tx, changed).await?;
    for login in &gone {
        on!(tx.conn(), |c| sqlx::query(
            "DELETE FROM desired_users WHERE login = $1"
        )
        .bind(login)
        .execute(c)
        .await
        .map(drop))?;
    }
    Ok(())
}

/// Stored desired rows that are current, and logins nobody desires:
/// streamed, so a no-op cycle holds no copy of 100k rows.
async fn desired_delta<'d>(
    tx: &mut Tx,
    desired: &'d Desired,
) -> Result<(HashSet<&'d str>, Vec<String>)> {
    let mut current = HashSet::new();
    let mut gone = vec![];
    on!(tx.conn(), |c| {
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

/// A listing cycle's plan replaces the listing lane's rows, and the rows of
/// the logins it plans; a targeted cycle's other rows stay (its push may be
/// running now).
async fn write_plan(tx: &mut Tx, cycle_id: i64, plan: &Plan, status_blocked: &str) -> Result<()> {
    on!(tx.conn(), |c| sqlx::query(
        "DELETE FROM plan_ops WHERE cycle_id IN
            (SELECT id FROM cycles WHERE kind IN ('incremental', 'full'))",
    )
    .execute(c)
    .await
    .map(drop))?;
    for op in plan.ops.iter().chain(&plan.held) {
        on!(tx.conn(), |c| sqlx::query(
            "DELETE FROM plan_ops WHERE login = $1"
        )
        .bind(&op.login)
        .execute(c)
        .await
        .map(drop))?;
    }
    let rows = (plan.ops.iter().map(|o| (o, PlanState::Planned)))
        .chain(plan.held.iter().map(|o| (o, PlanState::Held)));
    for (op, state) in rows {
        insert_op(tx, cycle_id, op, state, status_blocked).await?;
    }
    Ok(())
}

async fn insert_op(
    tx: &mut Tx,
    cycle_id: i64,
    op: &Op,
    state: PlanState,
    status_blocked: &str,
) -> Result<()> {
    on!(tx.conn(), |c| sqlx::query(
        "INSERT INTO plan_ops (cycle_id, login, action, payload, deprovision, state)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(cycle_id)
    .bind(&op.login)
    .bind(op.label(status_blocked))
    .bind(serde_json::to_string(op).unwrap_or_default())
    .bind(op.deprovision)
    .bind(state.as_str())
    .execute(c)
    .await
    .map(drop))?;
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
    for (login, sources) in by_login {
        on!(tx.conn(), |c| sqlx::query(
            "INSERT INTO conflicts (login, sources) VALUES ($1, $2)"
        )
        .bind(login)
        .bind(serde_json::to_string(&sources).unwrap_or_default())
        .execute(c)
        .await
        .map(drop))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::cycle::CycleKind;
    use crate::core::model::SourceKind;
    use crate::core::plan::Action;

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

    /// Issue 17: a listing cycle's plan erased every plan row, the fast
    /// lane's too, while its push may still be running.
    #[tokio::test]
    async fn a_listing_plan_leaves_the_fast_lanes_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let now = chrono::Utc::now();
        let fast = store.start_cycle(CycleKind::Payments, now).await.unwrap();
        let desired = Desired::default();
        let paid = plan_of("paid@x");
        (store.persist_targeted_plan(fast, &desired, &paid, "blocked"))
            .await
            .unwrap();
        for _ in 0..2 {
            let listing = store
                .start_cycle(CycleKind::Incremental, now)
                .await
                .unwrap();
            let plan = plan_of("listed@x");
            (store.persist_plan(listing, &desired, &plan, "blocked"))
                .await
                .unwrap();
        }
        let logins: Vec<String> = store
            .plan_rows()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.login)
            .collect();
        assert_eq!(
            logins,
            ["paid@x", "listed@x"],
            "one row each, the fast lane's kept"
        );
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
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let now = chrono::Utc::now();
        let listing = desired_of(&[("a@x", "h1"), ("b@x", "h2")]);
        let empty = Plan::default();
        for _ in 0..2 {
            let id = store
                .start_cycle(CycleKind::Incremental, now)
                .await
                .unwrap();
            (store.persist_plan(id, &listing, &empty, "blocked"))
                .await
                .unwrap();
        }
        let fast = store.start_cycle(CycleKind::Payments, now).await.unwrap();
        let paid = desired_of(&[("a@x", "h9")]);
        (store.persist_targeted_plan(fast, &paid, &plan_of("a@x"), "blocked"))
            .await
            .unwrap();
        assert_eq!(hashes(&store).await[0].1, "h9");
        let id = store
            .start_cycle(CycleKind::Incremental, now)
            .await
            .unwrap();
        (store.persist_plan(id, &listing, &empty, "blocked"))
            .await
            .unwrap();
        let want = [("a@x", "h1"), ("b@x", "h2")].map(|(l, h)| (l.to_string(), h.to_string()));
        assert_eq!(hashes(&store).await, want);
        // A login nobody desires any more goes, digest or not.
        let fewer = desired_of(&[("b@x", "h2")]);
        let id = store
            .start_cycle(CycleKind::Incremental, now)
            .await
            .unwrap();
        (store.persist_plan(id, &fewer, &empty, "blocked"))
            .await
            .unwrap();
        assert_eq!(hashes(&store).await, want[1..].to_vec());
    }
}
