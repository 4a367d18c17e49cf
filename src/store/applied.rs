//! The applied state: what the VMS confirmed, per login; the tree elements;
//! and the write-backs done. The only memory of the VMS.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;

use super::db::{on, on_pool, on_write, Row};
use super::logins::{bind_ids, placeholders};
use super::{account_key, decode_json, parse_ts, ts, Result, Store};
use crate::core::model::{AccountKey, SourceKind};
use crate::core::plan::{state_hash, Applied, AppliedUser};

/// A login whose last request's answer never came.
#[derive(Debug, Clone)]
pub struct InDoubt {
    pub login: String,
    /// What was asked: create, update, block or delete.
    pub op: String,
    pub since: DateTime<Utc>,
    /// The owner and the state the request asked for.
    pub user: AppliedUser,
}

/// Above this many logins, one pass over the table beats lookups by key.
const BY_KEY_LIMIT: usize = 2000;

impl Store {
    /// Everything applied: users, tree and write-backs.
    pub async fn load_applied(&self) -> Result<Applied> {
        let in_doubt = self.load_in_doubt().await?;
        Ok(Applied {
            users: self.load_applied_users(None).await?,
            tree: self.load_tree().await?,
            written: self.load_written().await?,
            in_doubt: in_doubt.into_iter().map(|d| (d.login, d.user)).collect(),
        })
    }

    /// The live applied users owned by accounts of `sources`: login ->
    /// owner. A user already gone (its account deleted) holds nothing: its
    /// login may pass to another account.
    pub async fn applied_owners_in(
        &self,
        sources: &std::collections::BTreeSet<SourceKind>,
    ) -> Result<BTreeMap<String, AccountKey>> {
        let mut out = BTreeMap::new();
        for source in sources {
            let rows: Vec<(String, String, String)> = on_pool!(self.db, |c| sqlx::query_as(
                "SELECT login, account_id, state_json FROM applied_users WHERE source = $1",
            )
            .bind(source.as_str())
            .fetch_all(c)
            .await)?;
            for (login, id, state) in rows {
                let state: crate::core::model::UserState = decode_json(&state)?;
                if state.gone {
                    continue;
                }
                let owner = AccountKey {
                    source: *source,
                    id,
                };
                out.insert(login, owner);
            }
        }
        Ok(out)
    }

    /// Streams `(login, hash)` of every applied user: enough to tell which
    /// logins need planning without holding 100k rows.
    pub async fn scan_applied_hashes(&self, mut f: impl FnMut(&str, &str)) -> Result<()> {
        on_pool!(self.db, |c| {
            let mut rows = sqlx::query("SELECT login, hash FROM applied_users").fetch(c);
            while let Some(r) = rows.try_next().await? {
                let r = Row::from(r);
                f(r.get::<&str, _>(0), r.get::<&str, _>(1));
            }
        });
        Ok(())
    }

    /// The applied users among `logins` (all when None).
    pub async fn load_applied_users(
        &self,
        logins: Option<&HashSet<String>>,
    ) -> Result<BTreeMap<String, AppliedUser>> {
        match logins {
            Some(set) if set.len() <= BY_KEY_LIMIT => self.applied_by_key(set).await,
            _ => self.applied_by_scan(logins).await,
        }
    }

    async fn applied_by_key(
        &self,
        logins: &HashSet<String>,
    ) -> Result<BTreeMap<String, AppliedUser>> {
        let mut out = BTreeMap::new();
        for login in logins {
            let row = on_pool!(self.db, |c| sqlx::query(
                "SELECT source, account_id, state_json FROM applied_users WHERE login = $1",
            )
            .bind(login)
            .fetch_optional(c)
            .await
            .map(Row::opt))?;
            if let Some(r) = row {
                out.insert(login.clone(), applied_user(&r, 0)?);
            }
        }
        Ok(out)
    }

    /// Rows are streamed and only the wanted ones decoded.
    async fn applied_by_scan(
        &self,
        logins: Option<&HashSet<String>>,
    ) -> Result<BTreeMap<String, AppliedUser>> {
        let mut out = BTreeMap::new();
        let sql = "SELECT login, source, account_id, state_json FROM applied_users";
        on_pool!(self.db, |c| {
            let mut rows = sqlx::query(sql).fetch(c);
            while let Some(r) = rows.try_next().await? {
                let r = Row::from(r);
                let login: String = r.get(0);
                if logins.is_some_and(|l| !l.contains(&login)) {
                    continue;
                }
                out.insert(login, applied_user(&r, 1)?);
            }
        });
        Ok(out)
    }

    pub async fn load_tree(&self) -> Result<BTreeMap<String, String>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT external_id, name FROM applied_tree"
        )
        .fetch_all(c)
        .await
        .map(Row::all))?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The applied tree elements among `ids` (a targeted cycle's).
    pub async fn load_tree_of(&self, ids: &[&str]) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT external_id, name FROM applied_tree WHERE external_id IN ({})",
                placeholders(1, chunk.len())
            );
            let rows = on_pool!(self.db, |c| bind_ids(chunk, sqlx::query(&sql))
                .fetch_all(c)
                .await
                .map(Row::all))?;
            out.extend(rows.into_iter().map(|r| (r.get(0), r.get(1))));
        }
        Ok(out)
    }

    /// Write-backs done for the accounts among `keys`.
    pub async fn load_written_of(
        &self,
        keys: &[AccountKey],
    ) -> Result<HashMap<AccountKey, String>> {
        let mut by_source: BTreeMap<SourceKind, Vec<&str>> = BTreeMap::new();
        for k in keys {
            by_source.entry(k.source).or_default().push(&k.id);
        }
        let mut out = HashMap::new();
        for (source, ids) in by_source {
            for chunk in ids.chunks(500) {
                let sql = format!(
                    "SELECT account_id, value FROM writebacks
                     WHERE source = $1 AND account_id IN ({})",
                    placeholders(2, chunk.len())
                );
                let rows = on_pool!(self.db, |c| {
                    let q = sqlx::query(&sql).bind(source.as_str());
                    bind_ids(chunk, q).fetch_all(c).await.map(Row::all)
                })?;
                let key = |id| AccountKey { source, id };
                out.extend(rows.into_iter().map(|r| (key(r.get(0)), r.get(1))));
            }
        }
        Ok(out)
    }

    /// Write-backs done: account -> value written.
    pub async fn load_written(&self) -> Result<HashMap<AccountKey, String>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT source, account_id, value FROM writebacks"
        )
        .fetch_all(c)
        .await
        .map(Row::all))?;
        rows.into_iter()
            .map(|r| Ok((account_key(&r.get::<String, _>(0), r.get(1))?, r.get(2))))
            .collect()
    }

    /// Records what one confirmed answer proved about `login`, at once, in
    /// its own transaction: `Some` is its new applied state, `None` that the
    /// VMS no longer has the user. `verify_from`: the write stated the full
    /// state, and re-verification counts from then (`core::pacing`).
    pub async fn set_applied(
        &self,
        login: &str,
        user: Option<&AppliedUser>,
        verify_from: Option<i64>,
    ) -> Result<()> {
        let Some(user) = user else {
            on_write!(self, |c| sqlx::query(
                "DELETE FROM applied_users WHERE login = $1"
            )
            .bind(login)
            .execute(c)
            .await
            .map(drop))?;
            return Ok(());
        };
        on_write!(self, |c| sqlx::query(
            "INSERT INTO applied_users
                (login, source, account_id, state_json, hash, applied_at, asserted_at, verify_from)
             VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $7 IS NOT NULL THEN $6 END, $7)
             ON CONFLICT (login) DO UPDATE SET source = excluded.source,
                account_id = excluded.account_id, state_json = excluded.state_json,
                hash = excluded.hash, applied_at = excluded.applied_at,
                asserted_at = COALESCE(excluded.asserted_at, applied_users.asserted_at),
                verify_from = COALESCE(excluded.verify_from, applied_users.verify_from)",
        )
        .bind(login)
        .bind(user.owner.source.as_str())
        .bind(&user.owner.id)
        .bind(serde_json::to_string(&user.state).unwrap_or_default())
        .bind(state_hash(&user.state))
        .bind(ts(Utc::now()))
        .bind(verify_from)
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    pub async fn record_tree(&self, external_id: &str, name: &str) -> Result<()> {
        on_write!(self, |c| {
            sqlx::query(
            "INSERT INTO applied_tree (external_id, name, applied_at) VALUES ($1, $2, $3)
             ON CONFLICT (external_id) DO UPDATE SET name = excluded.name, applied_at = excluded.applied_at",
        )
        .bind(external_id)
        .bind(name)
        .bind(ts(Utc::now()))
        .execute(c)
        .await.map(drop)
        })?;
        Ok(())
    }

    pub async fn record_writeback(&self, account: &AccountKey, value: &str) -> Result<()> {
        on_write!(self, |c| sqlx::query(
            "INSERT INTO writebacks (source, account_id, value, written_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (source, account_id) DO UPDATE SET value = excluded.value,
                written_at = excluded.written_at",
        )
        .bind(account.source.as_str())
        .bind(&account.id)
        .bind(value)
        .bind(ts(Utc::now()))
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Written before a request goes out: until an answer proves what
    /// happened, the login is in doubt (SPEC §9.1). An older doubt keeps its
    /// `since`.
    pub async fn mark_in_doubt(&self, login: &str, op: &str, user: &AppliedUser) -> Result<()> {
        on_write!(self, |c| sqlx::query(
            "INSERT INTO in_doubt (login, op, source, account_id, state_json, since)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (login) DO UPDATE SET op = excluded.op, source = excluded.source,
                account_id = excluded.account_id, state_json = excluded.state_json",
        )
        .bind(login)
        .bind(op)
        .bind(user.owner.source.as_str())
        .bind(&user.owner.id)
        .bind(serde_json::to_string(&user.state).unwrap_or_default())
        .bind(ts(Utc::now()))
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    /// When the login's applied state was last confirmed, and last asserted
    /// in full (re-verification), as stored (RFC 3339).
    pub async fn applied_times(&self, login: &str) -> Result<Option<(String, Option<String>)>> {
        let row = on_pool!(self.db, |c| sqlx::query(
            "SELECT applied_at, asserted_at FROM applied_users WHERE login = $1"
        )
        .bind(login)
        .fetch_optional(c)
        .await
        .map(Row::opt))?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Whether the VMS is known to hold exactly `user` for `login` (None:
    /// no user): recorded so, and not in doubt.
    pub async fn holds_exactly(&self, login: &str, user: Option<&AppliedUser>) -> Result<bool> {
        let in_doubt: Option<i64> = on_pool!(self.db, |c| sqlx::query_scalar(
            "SELECT 1 FROM in_doubt WHERE login = $1"
        )
        .bind(login)
        .fetch_optional(c)
        .await)?;
        if in_doubt.is_some() {
            return Ok(false);
        }
        let one = HashSet::from([login.to_string()]);
        let applied = self.applied_by_key(&one).await?;
        Ok(applied.get(login) == user)
    }

    pub async fn clear_in_doubt(&self, login: &str) -> Result<()> {
        on_write!(self, |c| sqlx::query(
            "DELETE FROM in_doubt WHERE login = $1"
        )
        .bind(login)
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Applied users that are live, active on the VMS: the base of the
    /// safety ratio, so that blocked history does not loosen it.
    pub async fn count_live_users(&self, status_active: &str) -> Result<u64> {
        let b = self.db.backend();
        let (status, gone) = (
            b.json_text("state_json", "status"),
            b.json_true("state_json", "gone"),
        );
        let sql = format!("SELECT COUNT(*) FROM applied_users WHERE {status} = $1 AND NOT {gone}");
        let n: i64 = on_pool!(self.db, |c| sqlx::query_scalar(&sql)
            .bind(status_active)
            .fetch_one(c)
            .await)?;
        Ok(n.max(0) as u64)
    }

    /// Users already blocked because their account is gone: nothing to do
    /// for them while nobody desires them (a full resync re-asserts them).
    pub async fn deprovisioned_logins(&self, status_blocked: &str) -> Result<HashSet<String>> {
        let b = self.db.backend();
        let (status, gone) = (
            b.json_text("state_json", "status"),
            b.json_true("state_json", "gone"),
        );
        let sql = format!("SELECT login FROM applied_users WHERE {gone} AND {status} = $1");
        let rows: Vec<String> = on_pool!(self.db, |c| sqlx::query_scalar(&sql)
            .bind(status_blocked)
            .fetch_all(c)
            .await)?;
        Ok(rows.into_iter().collect())
    }

    /// Applied users per owning source.
    pub async fn applied_per_source(&self) -> Result<BTreeMap<String, u64>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT source, COUNT(*) FROM applied_users GROUP BY source"
        )
        .fetch_all(c)
        .await
        .map(Row::all))?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get::<i64, _>(1).max(0) as u64))
            .collect())
    }

    pub async fn count_in_doubt(&self) -> Result<u64> {
        let n: i64 = on_pool!(self.db, |c| sqlx::query_scalar(
            "SELECT COUNT(*) FROM in_doubt"
        )
        .fetch_one(c)
        .await)?;
        Ok(n.max(0) as u64)
    }

    /// Every login in doubt, oldest first.
    pub async fn load_in_doubt(&self) -> Result<Vec<InDoubt>> {
        let rows = on_pool!(self.db, |c| {
            sqlx::query(
            "SELECT login, op, since, source, account_id, state_json FROM in_doubt ORDER BY since",
        )
        .fetch_all(c)
        .await.map(Row::all)
        })?;
        rows.iter()
            .map(|r| {
                Ok(InDoubt {
                    login: r.get(0),
                    op: r.get(1),
                    since: parse_ts(&r.get::<String, _>(2)).unwrap_or_else(Utc::now),
                    user: applied_user(r, 3)?,
                })
            })
            .collect()
    }

    /// Re-derives every stored hash from its state (after the definition of
    /// "changed" moved; see `core::plan::state_hash`).
    pub(super) async fn rehash_states(&self) -> Result<u64> {
        let mut n = 0;
        for table in ["applied_users", "desired_users"] {
            let rows = on_pool!(self.db, |c| sqlx::query(&format!(
                "SELECT login, state_json FROM {table}"
            ))
            .fetch_all(c)
            .await
            .map(Row::all))?;
            let mut tx = self.write_tx().await?;
            for r in rows {
                let state = decode_json(&r.get::<String, _>(1))?;
                on!(tx.conn(), |c| sqlx::query(&format!(
                    "UPDATE {table} SET hash = $2 WHERE login = $1"
                ))
                .bind(r.get::<String, _>(0))
                .bind(state_hash(&state))
                .execute(c)
                .await
                .map(drop))?;
                n += 1;
            }
            if table == "desired_users" {
                super::plan::write_digest(&mut tx, None).await?;
            }
            tx.commit().await?;
        }
        Ok(n)
    }
}

/// `(source, account_id, state_json)` from column `first` on.
fn applied_user(r: &Row, first: usize) -> Result<AppliedUser> {
    Ok(AppliedUser {
        owner: account_key(&r.get::<String, _>(first), r.get(first + 1))?,
        state: decode_json(&r.get::<String, _>(first + 2))?,
    })
}
