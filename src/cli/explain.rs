//! `explain LOGIN|SOURCE:ID [--json]`: one account traced like a
//! provision-on-demand, from the state store, without touching any system.

use std::collections::{BTreeMap, HashSet};

use chrono::Utc;
use serde_json::{json, Value};

use billsync::config::Settings;
use billsync::core::desired::{self, SourceInput};
use billsync::core::model::AccountKey;
use billsync::core::plan::{self, Applied, PlanOptions};
use billsync::engine::report_entries;

pub async fn run(settings: Settings, target: String, json_out: bool) -> u8 {
    let store = match super::open_store(&settings).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match explain(&settings, &store, &target).await {
        Ok(doc) => {
            if json_out {
                super::print_json(&doc);
            } else {
                print_human(&doc);
            }
            if doc["found"].as_bool() == Some(true) {
                super::EXIT_OK
            } else {
                super::EXIT_UNFINISHED
            }
        }
        Err(e) => {
            eprintln!("billsync: {e}");
            super::EXIT_ABORTED
        }
    }
}

async fn resolve(
    store: &billsync::store::Store,
    target: &str,
) -> Result<Option<AccountKey>, billsync::store::StoreError> {
    if let Some(key) = AccountKey::parse(target) {
        return Ok(Some(key));
    }
    if let Some(row) = store.desired_user(target).await? {
        return Ok(Some(row.owner));
    }
    let applied = store.load_applied_users(Some(&one(target))).await?;
    Ok(applied.get(target).map(|a| a.owner.clone()))
}

fn one(login: &str) -> HashSet<String> {
    HashSet::from([login.to_string()])
}

async fn explain(
    settings: &Settings,
    store: &billsync::store::Store,
    target: &str,
) -> Result<Value, billsync::store::StoreError> {
    let Some(key) = resolve(store, target).await? else {
        return Ok(json!({"target": target, "found": false,
                         "why": "no source account or VMS user known by that login or SOURCE:ID"}));
    };
    let stored = store.source_account(key.source, &key.id).await?;
    let Some(stored) = stored else {
        return Ok(
            json!({"target": target, "found": false, "account": key.to_string(),
                         "why": "the state store has no such source account (not listed yet?)"}),
        );
    };
    let merged = match &stored.details {
        Some(d) => stored.list.merged_with(d),
        None => stored.list.clone(),
    };
    let core = settings.core_config();
    let normalized = settings.normalizer(key.source).map(|n| n.account(&merged));
    let mut doc = json!({
        "target": target,
        "found": true,
        "account": key.to_string(),
        "source_record": {
            "row": serde_json::from_str::<Value>(&stored.row_json).unwrap_or(Value::Null),
            "details": stored.details,
            "first_seen": stored.first_seen,
            "last_seen": stored.last_seen,
            "missing_cycles": stored.missing_cycles,
        },
    });
    let account = match normalized {
        Err(e) => {
            doc["normalized"] = json!({"error": format!("source not enabled: {e}")});
            return Ok(doc);
        }
        Ok(Err(invalid)) => {
            doc["normalized"] = json!({"invalid": invalid.to_string()});
            doc["note"] =
                json!("an invalid record is skipped and reported; its VMS user is left alone");
            return Ok(doc);
        }
        Ok(Ok(a)) => a,
    };
    doc["normalized"] = serde_json::to_value(&account).unwrap_or(Value::Null);
    let last_paid = store.last_paid(key.source).await?;
    doc["last_paid"] = json!(last_paid.get(&key.id));
    let mut inputs = BTreeMap::new();
    inputs.insert(
        key.source,
        SourceInput {
            complete: true,
            accounts: vec![account.clone()],
            missing: [(key.id.clone(), stored.missing_cycles)]
                .into_iter()
                .collect(),
            last_paid,
            protected: Default::default(),
            fresh: Default::default(),
        },
    );
    let d = desired::build(&core, inputs, Utc::now());
    let login = account.login.clone();
    let du = d.users.get(&login);
    doc["rules_matched"] = json!(du.map(|u| u.rules.clone()).unwrap_or_default());
    doc["desired"] = serde_json::to_value(du.map(|u| &u.state)).unwrap_or(Value::Null);
    let mut applied = Applied {
        users: store.load_applied_users(Some(&one(&login))).await?,
        ..Default::default()
    };
    if let Some(name) = store.load_tree().await?.remove(&account.billing_id) {
        applied.tree.insert(account.billing_id.clone(), name);
    }
    if let Some(w) = store.load_written().await?.remove(&key) {
        applied.written.insert(key.clone(), w);
    }
    doc["applied"] =
        serde_json::to_value(applied.users.get(&login).map(|a| &a.state)).unwrap_or(Value::Null);
    let p = plan::plan(&core, &d, &applied, &PlanOptions::default());
    doc["operations"] = serde_json::to_value(report_entries(&p, &core)).unwrap_or(Value::Null);
    remembered(store, &login, &account.billing_id, &mut doc).await?;
    Ok(doc)
}

/// What the store remembers of the login: quarantine, backoff, doubt,
/// conflict and recent audit.
async fn remembered(
    store: &billsync::store::Store,
    login: &str,
    billing_id: &str,
    doc: &mut Value,
) -> Result<(), billsync::store::StoreError> {
    let q: Vec<_> = store
        .load_quarantine()
        .await?
        .into_iter()
        .filter(|q| q.key == login || q.key == billing_id)
        .map(|q| json!({"part": q.part, "error": q.error, "since": q.since}))
        .collect();
    doc["quarantine"] = json!(q);
    doc["pending"] = json!(store.load_retries().await?.get(login));
    let doubt = store
        .load_in_doubt()
        .await?
        .into_iter()
        .find(|d| d.login == login);
    doc["in_doubt"] = json!(doubt.map(|d| json!({"op": d.op, "since": d.since})));
    let conflict = store
        .conflicts()
        .await?
        .into_iter()
        .find(|c| c.login == login);
    doc["conflict"] = json!(conflict.map(|c| c.sources));
    doc["recent_audit"] = json!(store.audit_of(login, 10).await?);
    Ok(())
}

fn print_human(doc: &Value) {
    if doc["found"].as_bool() != Some(true) {
        outln!(
            "{}: {}",
            doc["target"].as_str().unwrap_or(""),
            doc["why"].as_str().unwrap_or("not found")
        );
        return;
    }
    for key in [
        "account",
        "source_record",
        "normalized",
        "last_paid",
        "rules_matched",
        "desired",
        "applied",
        "operations",
        "quarantine",
        "pending",
        "in_doubt",
        "conflict",
        "recent_audit",
        "note",
    ] {
        if let Some(v) = doc.get(key) {
            let text = serde_json::to_string_pretty(v).unwrap_or_default();
            outln!("{key}: {text}");
        }
    }
}
