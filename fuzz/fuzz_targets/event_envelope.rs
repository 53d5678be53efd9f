//! The event envelope parser (after a valid signature): never a panic, and what it accepts
//! has the shape the inbox relies on.
#![no_main]

use billsync::webhooks::ingest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = ingest::parse_envelope(data) {
        assert!(envelope.id.starts_with("evt_") && envelope.id.len() <= 255);
        assert!(!envelope.kind.is_empty() && envelope.kind.len() <= 255);
        assert!(envelope.created >= 0);
        if let Some(customer) = &envelope.customer_id {
            assert!(customer.starts_with("cus_"));
            assert!(customer
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        }
        let filed = ingest::file(envelope, data, false);
        assert_eq!(filed.payload.len() >= 2, true);
    }
});
