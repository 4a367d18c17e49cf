//! `quarantine list [--json] | release (LOGIN... | --all)`.

use serde_json::json;

use super::QuarantineAction;
use billsync::config::Settings;

pub async fn run(settings: Settings, action: QuarantineAction) -> u8 {
    let store = match super::open_store(&settings).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match action {
        QuarantineAction::List { json } => match store.load_quarantine().await {
            Ok(entries) => {
                if json {
                    let list: Vec<_> = entries
                        .iter()
                        .map(|q| {
                            json!({"login": q.key, "part": q.part, "error": q.error,
                                   "since": q.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)})
                        })
                        .collect();
                    super::print_json(&list);
                } else if entries.is_empty() {
                    outln!("nothing is quarantined");
                } else {
                    for q in entries {
                        outln!(
                            "{}  {}  {}  {}",
                            q.key,
                            q.part.as_str(),
                            q.since.to_rfc3339(),
                            q.error
                        );
                    }
                }
                super::EXIT_OK
            }
            Err(e) => {
                eprintln!("billsync: {e}");
                super::EXIT_ABORTED
            }
        },
        QuarantineAction::Release { logins, all } => {
            let keys = (!all).then_some(logins.as_slice());
            match store.release_quarantine(keys).await {
                Ok(n) => {
                    outln!("released {n}; the next cycle pushes them again");
                    super::EXIT_OK
                }
                Err(e) => {
                    eprintln!("billsync: {e}");
                    super::EXIT_ABORTED
                }
            }
        }
    }
}
