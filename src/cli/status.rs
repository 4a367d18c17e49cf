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
    if let Some(l) = doc.get("leader").filter(|v| v.is_object()) {
        let state = match l["expired"].as_bool() {
            Some(true) => "expired",
            _ => "until",
        };
        outln!(
            "leader: {} (epoch {}, {state} {})",
            l["node"].as_str().unwrap_or("?"),
            l["epoch"],
            seconds(l["expires"].as_str().unwrap_or("?"))
        );
    }
    if let Some(v) = doc.get("oldest_verification").filter(|v| !v.is_null()) {
        let hours = v["age_secs"].as_i64().unwrap_or(0) as f64 / 3600.0;
        outln!(
            "oldest verification: {} ({hours:.1} h ago)",
            seconds(v["at"].as_str().unwrap_or("?"))
        );
    }
    outln!("last cycles:");
    for c in list(doc, "cycles") {
        outln!(
            "  {} {:<11} {:<8} applied {} pending {} quarantined {} held {}",
            seconds(c["started_at"].as_str().unwrap_or("")),
            c["kind"].as_str().unwrap_or(""),
            c["result"].as_str().unwrap_or(""),
            c["applied"],
            c["pending"],
            c["quarantined"],
            c["held"]
        );
    }
    if let Some(by_source) = doc["services"].as_object().filter(|m| !m.is_empty()) {
        for (source, states) in by_source {
            outln!("services of {source}: {states}");
        }
    }
    for (title, key, fields) in LISTS {
        print_list(title, &list(doc, key), fields);
    }
    for n in list(doc, "notices") {
        outln!(
            "notice ({}): {}",
            seconds(n["at"].as_str().unwrap_or("")),
            n["message"].as_str().unwrap_or("")
        );
    }
    if doc["resync_requested"].as_bool() == Some(true) {
        outln!("a resync is requested and waits for the next cycle");
    }
    if doc["approval_pending"].as_bool() == Some(true) {
        outln!("an approval is recorded and waits for the next cycle");
    }
}

fn print_list(title: &str, items: &[Value], fields: &[&str]) {
    outln!("{title}: {}", items.len());
    for item in items.iter().take(50) {
        let parts: Vec<String> = fields
            .iter()
            .map(|f| match &item[*f] {
                Value::String(s) => seconds(s),
                Value::Null => "-".into(),
                other => other.to_string(),
            })
            .collect();
        outln!("  {}", parts.join("  "));
    }
    if items.len() > 50 {
        outln!("  ... and {} more (see --json)", items.len() - 50);
    }
}

/// An RFC 3339 time to the second, for people (`--json` keeps it whole);
/// any other text as it is.
pub fn seconds(text: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(text) {
        Ok(t) => t
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%d %H:%M:%SZ")
            .to_string(),
        Err(_) => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_shown_to_the_second() {
        let t = "2026-12-01T13:37:37.641234567Z";
        assert_eq!(super::seconds(t), "2026-12-01 13:37:37Z");
        assert_eq!(super::seconds("client1@x"), "client1@x");
    }
}
