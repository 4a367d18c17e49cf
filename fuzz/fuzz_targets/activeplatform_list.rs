//! ActivePlatform answers: any JSON through the list envelope and the
//! account decoder. Must never panic.
#![no_main]

use billsync::sources::activeplatform::{decode_account, list_envelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    if let Ok(rows) = list_envelope(value) {
        for row in rows {
            if let Some(obj) = row.as_object() {
                let _ = decode_account(obj, "1".into());
            }
        }
    }
});
