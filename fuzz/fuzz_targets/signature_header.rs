//! The `Stripe-Signature` header and its verification: never a panic, and nothing but the
//! real signature of the body verifies.
#![no_main]

use billsync::{config::Secret, webhooks::signature};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "whsec_fuzz";
const BODY: &[u8] = br#"{"id":"evt_1","type":"customer.updated","created":1}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let _ = signature::parse_header(header);
    let verified = signature::verify(Some(header), BODY, &[Secret::new(SECRET)], u64::MAX, 0);
    if let Ok(timestamp) = verified {
        // Only the true HMAC for that timestamp can have matched.
        let expected = hex_lower(&signature::sign(SECRET, timestamp, BODY));
        // (Hex is case-insensitive: upper-case digits are the same bytes.)
        assert!(
            header.to_ascii_lowercase().contains(&expected),
            "verified without the signature: {header:?}"
        );
    }
});

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
