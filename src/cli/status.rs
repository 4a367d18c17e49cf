//! `status [--json]`.

use serde_json::Value;

use billsync::config::Settings;

pub async fn run(settings: Settings, json: bool) -> u8 {
    let store = match super::open_store(&settings).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let doc = match billsync::status::status_json(&store, &settings).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("billsync: {e}");
            return super::EXIT_ABORTED;
        }
    };
    if json {
        super::print_json(&doc);
        return super::EXIT_OK;
    }
    print_human(&doc);
    super::EXIT_OK
}

/// The lists `status` prints: title, key in the document, fields shown.
const LISTS: [(&str, &str, &[&str]); 8] = [
    (
        "pending",
        "pending",
        &["login", "attempts", "next_attempt_at", "last_error"],
    ),
    (
        "quarantined",
        "quarantined",
        &["login", "part", "since", "error"],
    ),
    ("held deprovisions", "held", &["login", "action"]),
    ("frozen sources", "frozen", &["source", "users", "note"]),
    (
        "in doubt (pushed in full next)",
        "in_doubt",
        &["login", "op", "since"],
    ),
    (
        "requests dropped after failing cycles",
        "dropped_requests",
        &["kind", "requested_at", "attempts", "logins"],
    ),
    ("login conflicts", "conflicts", &["login", "sources"]),
    (
        "invalid source records",
        "invalid",
        &["source", "id", "reason", "detail"],
    ),
];

fn list(doc: &Value, key: &str) -> Vec<Value> {
    doc.get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn print_human(doc: &Value) {
    if let Some(v) = doc.get("oldest_verification").filter(|v| !v.is_null()) {
        let hours = v["age_secs"].as_i64().unwrap_or(0) as f64 / 3600.0;
        println!(
            "oldest verification: {} ({hours:.1} h ago)",
            v["at"].as_str().unwrap_or("?")
        );
    }
    println!("last cycles:");
    for c in list(doc, "cycles") {
        println!(
            "  {} {:<11} {:<8} applied {} pending {} quarantined {} held {}",
            c["started_at"].as_str().unwrap_or(""),
            c["kind"].as_str().unwrap_or(""),
            c["result"].as_str().unwrap_or(""),
            c["applied"],
            c["pending"],
            c["quarantined"],
            c["held"]
        );
    }
    for (title, key, fields) in LISTS {
        print_list(title, &list(doc, key), fields);
    }
    for n in list(doc, "notices") {
        println!(
            "notice ({}): {}",
            n["at"].as_str().unwrap_or(""),
            n["message"].as_str().unwrap_or("")
        );
    }
    if doc["resync_requested"].as_bool() == Some(true) {
        println!("a resync is requested and waits for the next cycle");
    }
    if doc["approval_pending"].as_bool() == Some(true) {
        println!("an approval is recorded and waits for the next cycle");
    }
}

fn print_list(title: &str, items: &[Value], fields: &[&str]) {
    println!("{title}: {}", items.len());
    for item in items.iter().take(50) {
        let parts: Vec<String> = fields
            .iter()
            .map(|f| match &item[*f] {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            })
            .collect();
        println!("  {}", parts.join("  "));
    }
    if items.len() > 50 {
        println!("  ... and {} more (see --json)", items.len() - 50);
    }
}
