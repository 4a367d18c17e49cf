//! BILLmanager answers: any bytes through the document decoder, the row
//! extraction and the scalar reader. Must never panic.
#![no_main]

use billsync::sources::billmanager::{decode_doc, elems, scalar};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(doc) = decode_doc(body) {
        if let Ok(rows) = elems(&doc) {
            for row in rows {
                if let Some(obj) = row.as_object() {
                    for v in obj.values() {
                        let _ = scalar(v);
                    }
                }
            }
        }
    }
});
