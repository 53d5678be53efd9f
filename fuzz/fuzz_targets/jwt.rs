//! The user routes' front door: any bytes as a bearer token. Never a panic, and nothing is
//! accepted but a token signed with the configured HS256 secret.
#![no_main]

use std::sync::OnceLock;

use billsync::{auth::JwtVerifier, config::JwtConfig};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-jwt-secret-0123456789-abcdefghijklmnop";

fn verifier() -> &'static (tokio::runtime::Runtime, std::sync::Arc<JwtVerifier>) {
    static VERIFIER: OnceLock<(tokio::runtime::Runtime, std::sync::Arc<JwtVerifier>)> =
        OnceLock::new();
    VERIFIER.get_or_init(|| {
        let config = JwtConfig {
            secret: Some(billsync::config::Secret::new(SECRET)),
            jwks_url: None,
            audience: "authenticated".into(),
            issuer: None,
            jwks_min_refresh: std::time::Duration::from_secs(10),
            jwks_max_age: std::time::Duration::from_secs(600),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (runtime, JwtVerifier::from_config(&config).unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let (runtime, verifier) = verifier();
    if runtime.block_on(verifier.verify(token)).is_ok() {
        // A forged token would have to carry a valid HMAC of its own header and claims.
        let (signed, signature) = token.rsplit_once('.').unwrap();
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(signed.as_bytes());
        let expected = mac.finalize().into_bytes();
        let decoded = base64_url_decode(signature);
        assert_eq!(
            decoded.as_deref(),
            Some(&expected[..]),
            "accepted a forged token"
        );
    }
});

fn base64_url_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    };
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        bits = (bits << 6) | u32::from(value(c)?);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Some(out)
}
