//! `resync [--login L]...` and `approve`: requests written to the state
//! store, acted on by the running daemon or the next `sync`.

use crate::config::Settings;
use crate::store::{PlanState, RequestKind};

pub async fn resync(settings: Settings, logins: Vec<String>) -> u8 {
    let store = match super::open_store(&settings).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let named = (!logins.is_empty()).then_some(logins.as_slice());
    match store.request(RequestKind::Resync, named).await {
        Ok(_) => {
            match named {
                None => {
                    println!("full resync requested; the next cycle will push every user in full")
                }
                Some(l) => println!("resync requested for {}: {}", l.len(), l.join(", ")),
            }
            super::EXIT_OK
        }
        Err(e) => {
            eprintln!("billsync: {e}");
            super::EXIT_ABORTED
        }
    }
}

pub async fn approve(settings: Settings) -> u8 {
    let store = match super::open_store(&settings).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let held = store
        .plan_rows()
        .await
        .map(|rows| rows.iter().filter(|r| r.state == PlanState::Held).count())
        .unwrap_or(0);
    match store.request(RequestKind::Approve, None).await {
        Ok(_) => {
            println!(
                "approval recorded: the next cycle sends its deprovisions whatever their number ({held} held now)"
            );
            super::EXIT_OK
        }
        Err(e) => {
            eprintln!("billsync: {e}");
            super::EXIT_ABORTED
        }
    }
}
