//! The shared JSON body parser (SPEC §11): any bytes, never a panic; a body
//! serde_json accepts is parsed exactly as serde_json parses it; a repaired
//! body (bytes that are not UTF-8, numbers that overflow) is still JSON.
#![no_main]

use billsync::http::parse_json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let strict = serde_json::from_slice::<serde_json::Value>(body);
    match (strict, parse_json(body)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Ok(_), Err(e)) => panic!("valid JSON refused: {}", e.message),
        (Err(_), Ok(v)) => {
            let text = serde_json::to_string(&v).unwrap();
            assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
        }
        (Err(_), Err(_)) => {}
    }
});
