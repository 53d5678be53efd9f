//! Stripe webhook signatures: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`, where each
//! `v1` is HMAC-SHA256 of `"{t}.{raw body}"` keyed by the whole `whsec_…` string. Any `v1` may
//! match any configured secret (rotation); comparison is constant-time; the timestamp must be
//! within the tolerance. The body is verified as raw bytes, before any parsing.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    Missing,
    #[error("the Stripe-Signature header is malformed")]
    MalformedHeader,
    #[error("the signature does not match")]
    Mismatch,
    #[error("the signature's timestamp is outside the tolerance")]
    OutOfTolerance,
}

impl SignatureError {
    pub fn code(self) -> &'static str {
        match self {
            Self::Missing => "missing_signature",
            Self::MalformedHeader => "invalid_signature_header",
            Self::Mismatch => "invalid_signature",
            Self::OutOfTolerance => "timestamp_out_of_tolerance",
        }
    }
}

/// A parsed header: the timestamp and every `v1` signature (other schemes are ignored, as
/// Stripe's libraries do).
#[derive(Debug, PartialEq, Eq)]
pub struct SignatureHeader {
    pub timestamp: i64,
    pub v1: Vec<[u8; 32]>,
}

pub fn parse_header(header: &str) -> Result<SignatureHeader, SignatureError> {
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for item in header.split(',') {
        let (key, value) = item
            .trim()
            .split_once('=')
            .ok_or(SignatureError::MalformedHeader)?;
        match key {
            "t" => {
                if timestamp.is_some() {
                    return Err(SignatureError::MalformedHeader);
                }
                let parsed = value
                    .parse::<i64>()
                    .ok()
                    .filter(|t| *t >= 0 && value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or(SignatureError::MalformedHeader)?;
                timestamp = Some(parsed);
            }
            "v1" => {
                let mut digest = [0u8; 32];
                // A v1 that is not 64 hex digits can never match: skip it like any other junk.
                if hex::decode_to_slice(value, &mut digest).is_ok() {
                    v1.push(digest);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::MalformedHeader)?;
    if v1.is_empty() {
        return Err(SignatureError::MalformedHeader);
    }
    Ok(SignatureHeader { timestamp, v1 })
}

/// The `v1` signature of `body` at `timestamp` under `secret`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Verifies a delivery; returns its signed timestamp.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secrets: &[Secret],
    tolerance_secs: u64,
    now: i64,
) -> Result<i64, SignatureError> {
    let header = parse_header(header.ok_or(SignatureError::Missing)?)?;
    let mut matched = false;
    for secret in secrets {
        let expected = sign(secret.expose(), header.timestamp, body);
        for candidate in &header.v1 {
            // Keep going after a match: the time taken does not depend on which one matched.
            matched |= bool::from(expected.ct_eq(candidate));
        }
    }
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    if now.abs_diff(header.timestamp) > tolerance_secs {
        return Err(SignatureError::OutOfTolerance);
    }
    Ok(header.timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"id":"evt_test_webhook","object":"event"}"#;
    const VECTOR: &str = "e7df43adcf699b3839cf5fe20429cae4712141aee3660a1671b34f77a1be9444";

    fn secrets(list: &[&str]) -> Vec<Secret> {
        list.iter().map(|s| Secret::new(*s)).collect()
    }

    #[test]
    fn the_design_vector_verifies() {
        assert_eq!(hex::encode(sign("whsec_test_secret", 12345, BODY)), VECTOR);
        let header = format!("t=12345,v1={VECTOR}");
        assert_eq!(
            verify(
                Some(&header),
                BODY,
                &secrets(&["whsec_test_secret"]),
                300,
                12345
            ),
            Ok(12345)
        );
    }

    #[test]
    fn rotation_accepts_any_secret_and_any_v1() {
        let old = hex::encode(sign("whsec_old", 100, BODY));
        let new = hex::encode(sign("whsec_new", 100, BODY));
        let both = secrets(&["whsec_new", "whsec_old"]);
        for header in [
            format!("t=100,v1={old}"),
            format!("t=100,v1={new}"),
            format!("t=100,v1={}, v1={new}", "0".repeat(64)),
            format!("t=100,v0=abc,v1={old},scheme=x"),
        ] {
            assert_eq!(
                verify(Some(&header), BODY, &both, 300, 100),
                Ok(100),
                "{header}"
            );
        }
        assert_eq!(
            verify(
                Some(&format!("t=100,v1={old}")),
                BODY,
                &secrets(&["whsec_new"]),
                300,
                100
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn every_rejection_has_its_code() {
        let s = secrets(&["whsec_test_secret"]);
        let good = format!("t=12345,v1={VECTOR}");
        assert_eq!(
            verify(None, BODY, &s, 300, 12345).unwrap_err().code(),
            "missing_signature"
        );
        for malformed in [
            "",
            "garbage",
            "t=abc,v1=00",
            "v1=00",
            &format!("v1={VECTOR}"),
            "t=12345",
            "t=12345,v0=00",
            "t=-5,v1=00",
            "t=1,t=2,v1=00",
        ] {
            assert_eq!(
                verify(Some(malformed), BODY, &s, 300, 12345)
                    .unwrap_err()
                    .code(),
                "invalid_signature_header",
                "{malformed:?}"
            );
        }
        assert_eq!(
            verify(Some(&good), b"{}", &s, 300, 12345)
                .unwrap_err()
                .code(),
            "invalid_signature"
        );
        assert_eq!(
            verify(Some(&good), BODY, &s, 300, 12345 + 301)
                .unwrap_err()
                .code(),
            "timestamp_out_of_tolerance"
        );
        assert_eq!(
            verify(Some(&good), BODY, &s, 300, 12345 - 301)
                .unwrap_err()
                .code(),
            "timestamp_out_of_tolerance"
        );
        assert_eq!(verify(Some(&good), BODY, &s, 300, 12345 + 300), Ok(12345));
    }

    #[test]
    fn any_mutation_is_rejected() {
        // A property over many random mutations of body, timestamp and signature.
        let s = secrets(&["whsec_test_secret"]);
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2_000 {
            let mut body = BODY.to_vec();
            let mut timestamp: i64 = 12345;
            let mut signature = sign("whsec_test_secret", timestamp, &body);
            match rng.u8(0..4) {
                0 => {
                    let i = rng.usize(0..body.len());
                    body[i] ^= 1 << rng.u8(0..8);
                }
                1 => body.insert(rng.usize(0..=body.len()), rng.u8(..)),
                2 => timestamp += i64::from(rng.u16(1..)) * if rng.bool() { 1 } else { -1 },
                _ => signature[rng.usize(0..32)] ^= 1 << rng.u8(0..8),
            }
            let header = format!("t={timestamp},v1={}", hex::encode(signature));
            let now = 12345;
            assert!(
                verify(Some(&header), &body, &s, u64::MAX, now).is_err(),
                "accepted a mutation: t={timestamp} body={:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }
}
