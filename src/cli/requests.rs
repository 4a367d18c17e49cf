//! `resync [--login L]...` and `approve`: requests written to the state
//! store, acted on by the running daemon or the next `sync`.

use billsync::config::Settings;
use billsync::store::RequestKind;

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
                    outln!("full resync requested; the next cycle will push every user in full")
                }
                Some(l) => outln!("resync requested for {}: {}", l.len(), l.join(", ")),
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
    match store.approve_held().await {
        Ok((_, held)) => {
            outln!(
                "approval recorded for the {held} logins held now: the next cycle sends their \
                 deprovisions; any that appeared since are counted against the threshold afresh"
            );
            super::EXIT_OK
        }
        Err(e) => {
            eprintln!("billsync: {e}");
            super::EXIT_ABORTED
        }
    }
}
