//! VMS answers: any status and body through the error decoder and the
//! confirmation rules (SPEC §9.2). Must never panic, and a body that is not
//! the user object must never confirm a user write.
#![no_main]

use billsync::vms::{decode_error, Expect};
use libfuzzer_sys::fuzz_target;
use reqwest::header::HeaderMap;

fuzz_target!(|input: (u16, &[u8])| {
    let (status, body) = input;
    let status = 100 + status % 500;
    let e = decode_error(status, &HeaderMap::new(), body);
    assert!(e.message.starts_with("HTTP"));
    let _ = Expect::Element("bm-1").confirmed_by(status, body);
    let _ = Expect::Deleted.confirmed_by(status, body);
    if Expect::User("ann@x.example").confirmed_by(status, body) {
        let text = String::from_utf8_lossy(body).to_lowercase();
        assert!(text.contains("ann@x.example"), "confirmed by {text}");
    }
});
