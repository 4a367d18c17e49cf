//! `explain LOGIN|SOURCE:ID [--json] [--vms]`: one account traced like a
//! provision-on-demand, from the state store, without touching any system;
//! `--vms` also asks the VMS (read-only) which cameras the user sees.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use billsync::config::Settings;
use billsync::core::cameras;
use billsync::core::desired::{self, SourceInput};
use billsync::core::model::{Account, AccountKey};
use billsync::core::plan::{self, Applied, PlanOptions};
use billsync::core::rules::{self, RuleContext};
use billsync::engine::report_entries;
use billsync::store::{PlanState, Store, StoreError, StoredAccount};

pub async fn run(settings: Settings, target: String, json_out: bool, vms: bool) -> u8 {
    let store = match super::open_store(&settings).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match explain(&settings, &store, &target).await {
        Ok(mut doc) => {
            if vms {
                ask_vms(&settings, &mut doc).await;
            }
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

async fn resolve(store: &Store, target: &str) -> Result<Option<AccountKey>, StoreError> {
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

async fn explain(settings: &Settings, store: &Store, target: &str) -> Result<Value, StoreError> {
    let Some(key) = resolve(store, target).await? else {
        return Ok(json!({"target": target, "found": false,
                         "why": "no source account or VMS user known by that login or SOURCE:ID"}));
    };
    let Some(stored) = store.source_account(key.source, &key.id).await? else {
        return Ok(
            json!({"target": target, "found": false, "account": key.to_string(),
                         "why": "the state store has no such source account (not listed yet?)"}),
        );
    };
    let mut doc = source_doc(target, &key, &stored);
    let Some(account) = normalized(settings, &key, &stored, &mut doc) else {
        return Ok(doc);
    };
    let input = input_of(store, &key, &stored, &account, &mut doc).await?;
    trace(settings, store, &account, input, &mut doc).await?;
    remembered(store, &account.login, &account.billing_id, &mut doc).await?;
    Ok(doc)
}

/// The stored source record, as read.
fn source_doc(target: &str, key: &AccountKey, stored: &StoredAccount) -> Value {
    json!({
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
    })
}

/// The account as normalized; `None` (and why, in `doc`) when it cannot
/// be: its source is off, or the record is invalid.
fn normalized(
    settings: &Settings,
    key: &AccountKey,
    stored: &StoredAccount,
    doc: &mut Value,
) -> Option<Account> {
    let merged = match &stored.details {
        Some(d) => stored.list.merged_with(d),
        None => stored.list.clone(),
    };
    match settings.normalizer(key.source).map(|n| n.account(&merged)) {
        Err(e) => {
            doc["normalized"] = json!({"error": format!("source not enabled: {e}")});
            None
        }
        Ok(Err(invalid)) => {
            doc["normalized"] = json!({"invalid": invalid.to_string()});
            doc["note"] =
                json!("an invalid record is skipped and reported; its VMS user is left alone");
            None
        }
        Ok(Ok(account)) => {
            doc["normalized"] = serde_json::to_value(&account).unwrap_or(Value::Null);
            doc["raw_status"] = json!(merged.status);
            Some(account)
        }
    }
}

/// The one-account input the desired state is built from, as a complete
/// source would give it.
async fn input_of(
    store: &Store,
    key: &AccountKey,
    stored: &StoredAccount,
    account: &Account,
    doc: &mut Value,
) -> Result<SourceInput, StoreError> {
    let last_paid = store.last_paid(key.source).await?;
    doc["last_paid"] = json!(last_paid.get(&key.id));
    let services = services_of(store, key, doc).await?;
    Ok(SourceInput {
        complete: true,
        accounts: vec![account.clone()],
        missing: [(key.id.clone(), stored.missing_cycles)]
            .into_iter()
            .collect(),
        last_paid,
        protected: Default::default(),
        fresh: Default::default(),
        services,
    })
}

/// Rules, desired and applied state, and the plan for the account's login.
async fn trace(
    settings: &Settings,
    store: &Store,
    account: &Account,
    input: SourceInput,
    doc: &mut Value,
) -> Result<(), StoreError> {
    let core = settings.core_config();
    let now = Utc::now();
    let key = account.key.clone();
    doc["rules"] = rule_verdicts(&core, account, &input, now);
    let d = desired::build(&core, BTreeMap::from([(key.source, input)]), now);
    let login = &account.login;
    let du = d.users.get(login);
    doc["rules_matched"] = json!(du.map(|u| u.rules.clone()).unwrap_or_default());
    let applied = applied_of(store, login, account, &key).await?;
    // A kept camera set is the applied one: shown as it will be sent.
    let desired_state = du.map(|u| {
        let mut state = u.state.clone();
        cameras::resolve(&mut state, applied.users.get(login));
        state
    });
    doc["desired"] = serde_json::to_value(desired_state).unwrap_or(Value::Null);
    doc["camera_error"] = json!(d.camera_errors.first().map(|(_, e)| e.to_string()));
    doc["applied"] =
        serde_json::to_value(applied.users.get(login).map(|a| &a.state)).unwrap_or(Value::Null);
    let times = store.applied_times(login).await?;
    doc["applied_at"] = json!(times.as_ref().map(|t| &t.0));
    doc["asserted_at"] = json!(times.and_then(|t| t.1));
    let p = plan::plan(&core, &d, &applied, &PlanOptions::default());
    doc["operations"] = serde_json::to_value(report_entries(&p, &core)).unwrap_or(Value::Null);
    let plans = store.plan_rows().await?;
    let held = plans
        .iter()
        .any(|r| &r.login == login && r.state == PlanState::Held);
    doc["held"] = json!(held);
    Ok(())
}

/// What was applied for this login, its tree element and its write-back.
async fn applied_of(
    store: &Store,
    login: &str,
    account: &Account,
    key: &AccountKey,
) -> Result<Applied, StoreError> {
    let mut applied = Applied {
        users: store.load_applied_users(Some(&one(login))).await?,
        ..Default::default()
    };
    if let Some(name) = store.load_tree().await?.remove(&account.billing_id) {
        applied.tree.insert(account.billing_id.clone(), name);
    }
    if let Some(w) = store.load_written().await?.remove(key) {
        applied.written.insert(key.clone(), w);
    }
    Ok(applied)
}

/// Each rule, matched or not, with the first condition that failed: the
/// very check cycles run (`core::rules::check`).
fn rule_verdicts(
    core: &desired::CoreConfig,
    account: &Account,
    input: &SourceInput,
    now: DateTime<Utc>,
) -> Value {
    let ctx = RuleContext {
        last_paid: &input.last_paid,
        services: &input.services,
        now,
    };
    let verdicts = core.rules.iter().map(|rule| {
        let why = rules::check(rule, account, &ctx).err();
        json!({
            "name": rule.name,
            "matched": why.is_none(),
            "why": why.as_ref().map(ToString::to_string),
            "unmet": why,
            "grant": rule.grant,
            "camera_groups": rule.camera_groups,
        })
    });
    Value::Array(verdicts.collect())
}

/// The account's services as the rules see them (pending ones as they
/// settled), and, for the document, each with its raw status.
async fn services_of(
    store: &Store,
    key: &AccountKey,
    doc: &mut Value,
) -> Result<HashMap<String, Vec<billsync::core::entitlements::Service>>, StoreError> {
    let mut by_owner = store.load_services(key.source).await?;
    let mine = by_owner.remove(&key.id).unwrap_or_default();
    let raw = store.raw_services_of(key).await?;
    doc["services"] = Value::Array(
        mine.iter()
            .map(|s| {
                let status = raw.get(&s.id).and_then(|r| r.status.clone());
                json!({"id": s.id, "plan": s.plan_name, "plan_id": s.plan_id,
                       "state": s.state.as_str(), "raw_status": status})
            })
            .collect(),
    );
    Ok(HashMap::from([(key.id.clone(), mine)]))
}

/// What the store remembers of the login: quarantine, backoff, doubt,
/// conflict and recent audit.
async fn remembered(
    store: &Store,
    login: &str,
    billing_id: &str,
    doc: &mut Value,
) -> Result<(), StoreError> {
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
    let text = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    if doc["found"].as_bool() != Some(true) {
        outln!("{}: {}", text(&doc["target"]), text(&doc["why"]));
        return;
    }
    outln!("{}", text(&doc["account"]));
    let rec = &doc["source_record"];
    outln!(
        "  source     first seen {}, last seen {}, missing from {} listings",
        when(&rec["first_seen"]),
        when(&rec["last_seen"]),
        rec["missing_cycles"]
    );
    let n = &doc["normalized"];
    if let Some(why) = n.get("invalid").or(n.get("error")) {
        outln!("  skipped    {}", text(why));
        outln!("             {}", text(&doc["note"]));
        return;
    }
    print_account(doc, text);
    for sv in doc["services"].as_array().into_iter().flatten() {
        outln!(
            "  service    {}: plan {} ({}), {} (raw {})",
            text(&sv["id"]),
            text(&sv["plan"]),
            text(&sv["plan_id"]),
            text(&sv["state"]),
            sv["raw_status"]
        );
    }
    print_rules(doc, text);
    print_users(doc);
    print_vms(doc);
    print_next(doc);
    print_remembered(doc, text);
}

fn print_account(doc: &Value, text: impl Fn(&Value) -> String) {
    let n = &doc["normalized"];
    outln!(
        "  account    login {}, status {} (raw {}), balance {} + credit limit {}, last paid {}",
        text(&n["login"]),
        text(&n["status"]),
        doc["raw_status"],
        text(&n["balance"]),
        text(&n["credit_limit"]),
        match doc["last_paid"].is_null() {
            true => "never".to_string(),
            false => when(&doc["last_paid"]),
        }
    );
}

fn print_rules(doc: &Value, text: impl Fn(&Value) -> String) {
    let rules = doc["rules"].as_array().cloned().unwrap_or_default();
    if rules.is_empty() {
        outln!("  rules      none configured: no managed permission is granted");
    }
    for r in rules {
        let verdict = match r["matched"].as_bool() == Some(true) {
            true => format!("matches: grants {}", list(&r["grant"])),
            false => format!("no: {}", text(&r["why"])),
        };
        outln!("  rule       {}: {verdict}", text(&r["name"]));
    }
}

fn print_users(doc: &Value) {
    outln!("  desired    {}", user(&doc["desired"]));
    if let Some(e) = doc["camera_error"].as_str() {
        outln!("             {e}: the camera set stays as applied");
    }
    let age = match doc["applied_at"].is_null() {
        true => String::new(),
        false => format!(" (confirmed {})", ago(&doc["applied_at"])),
    };
    outln!("  applied    {}{age}", user(&doc["applied"]));
}

fn print_next(doc: &Value) {
    let ops = doc["operations"].as_array().cloned().unwrap_or_default();
    if ops.is_empty() {
        outln!("  next       nothing to do: the VMS has what billsync wants");
    }
    for op in ops {
        let changes = list(&op["changes"]);
        outln!(
            "  next       {} ({changes})",
            op["action"].as_str().unwrap_or("?")
        );
    }
}

/// Quarantine, backoff, doubt, the safety hold, conflicts: each with what
/// releases it.
fn print_remembered(doc: &Value, text: impl Fn(&Value) -> String) {
    for q in doc["quarantine"].as_array().into_iter().flatten() {
        outln!(
            "  quarantined since {}: {}; released by a change of the account or `billsync quarantine release LOGIN`",
            when(&q["since"]),
            text(&q["error"])
        );
    }
    let p = &doc["pending"];
    if !p.is_null() {
        outln!(
            "  backing off after {} failed attempts until {}: {}; `billsync resync --login LOGIN` retries at once",
            p["attempts"],
            when(&p["next_attempt_at"]),
            text(&p["last_error"])
        );
    }
    let d = &doc["in_doubt"];
    if !d.is_null() {
        outln!(
            "  in doubt since {}: the answer to a {} never came; the next push states the full state",
            when(&d["since"]),
            text(&d["op"])
        );
    }
    if doc["held"].as_bool() == Some(true) {
        outln!("  held by the safety threshold: `billsync approve` lets the held deprovisions through once");
    }
    if !doc["conflict"].is_null() {
        outln!(
            "  login conflict between {}: the source with the higher priority owns it",
            list(&doc["conflict"])
        );
    }
}

/// A user state in a line.
fn user(v: &Value) -> String {
    if v.is_null() {
        return "no user".into();
    }
    let perms = match v["permissions"].as_array().is_some_and(|p| !p.is_empty()) {
        true => list(&v["permissions"]),
        false => "no managed permissions".into(),
    };
    let gone = if v["gone"].as_bool() == Some(true) {
        ", account gone"
    } else {
        ""
    };
    format!(
        "{} [{}], {perms}{}{gone}",
        v["status"].as_str().unwrap_or("?"),
        v["type"].as_str().unwrap_or("?"),
        camera_groups(&v["cameras"]),
    )
}

/// A user's camera groups in a few words (nothing while cameras are off).
fn camera_groups(c: &Value) -> String {
    if c.is_null() {
        return String::new();
    }
    let kept = match c["kept"].as_bool() == Some(true) {
        true => " (kept as applied)",
        false => "",
    };
    format!(", camera groups {}{kept}", list(&c["groups"]))
}

/// `--vms`: what the VMS says the user sees (`cameras/list`, read-only).
async fn ask_vms(settings: &Settings, doc: &mut Value) {
    let Some(login) = doc["normalized"]["login"].as_str().map(String::from) else {
        return;
    };
    let answer = match billsync::vms::VmsClient::new(&settings.vms) {
        Ok(client) => client
            .visible_cameras(&login)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    doc["vms_cameras"] = match answer {
        Ok(cams) => Value::Array(
            cams.iter()
                .map(|c| {
                    json!({"external_id": c.external_id, "name": c.name,
                                "status": c.status, "group_type": c.group_type})
                })
                .collect(),
        ),
        Err(e) => json!({"error": e}),
    };
}

fn print_vms(doc: &Value) {
    let cams = &doc["vms_cameras"];
    if let Some(e) = cams.get("error") {
        outln!(
            "  vms sees   (could not ask: {})",
            e.as_str().unwrap_or("?")
        );
        return;
    }
    let Some(cams) = cams.as_array() else {
        return;
    };
    if cams.is_empty() {
        outln!("  vms sees   no cameras");
    }
    let text = |v: &Value| v.as_str().unwrap_or("?").to_string();
    for c in cams {
        outln!(
            "  vms sees   camera {} \"{}\", {}, {} group",
            text(&c["external_id"]),
            text(&c["name"]),
            text(&c["status"]),
            text(&c["group_type"])
        );
    }
}

fn list(v: &Value) -> String {
    let items = v.as_array().into_iter().flatten();
    let items: Vec<&str> = items.filter_map(Value::as_str).collect();
    match items.is_empty() {
        true => "nothing".into(),
        false => items.join(", "),
    }
}

fn when(v: &Value) -> String {
    super::status::seconds(v.as_str().unwrap_or("?"))
}

/// A stored time and its age.
fn ago(v: &Value) -> String {
    let at = v
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
    match at {
        Some(t) => {
            let secs = (Utc::now() - t.with_timezone(&Utc)).num_seconds().max(0);
            format!("{}, {} ago", when(v), age(secs))
        }
        None => when(v),
    }
}

fn age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}
