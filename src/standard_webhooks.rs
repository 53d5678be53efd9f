//! Standard Webhooks signatures, for the events billsync sends the app (<https://www.standardwebhooks.com>): what the app's official
//! library verifies. A secret is `whsec_` and the base64 of its key; a delivery carries
//! `webhook-id`, `webhook-timestamp` and `webhook-signature`, the last one `v1,<base64>` per
//! secret, space-separated, each an HMAC-SHA256 of `{id}.{timestamp}.{body}`. Signing with every
//! configured secret is what makes a rotation safe: the app may verify with the old or the new.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a Standard Webhooks secret.
const PREFIX: &str = "whsec_";

/// Bytes of key in a secret `new_secret` makes (the spec asks for 24 to 64).
const NEW_KEY_BYTES: usize = 32;

/// Why a configured secret is not a Standard Webhooks secret (the value itself is never shown).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("must start with whsec_")]
    Prefix,
    #[error("is not whsec_ followed by base64")]
    Base64,
    #[error("holds {0} bytes of key; Standard Webhooks asks for 24 to 64")]
    Length(usize),
}

/// The keys deliveries are signed with, newest first.
#[derive(Clone)]
pub struct SigningKeys(Vec<Vec<u8>>);

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKeys({} [REDACTED])", self.0.len())
    }
}

impl SigningKeys {
    /// Parses comma-separated `whsec_…` secrets; at least one.
    pub fn parse(secrets: &str) -> Result<Self, SecretError> {
        let keys = secrets
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(decode)
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(SecretError::Prefix);
        }
        Ok(Self(keys))
    }

    /// The `webhook-signature` header of a delivery: one `v1,` signature per key.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        self.0
            .iter()
            .map(|key| {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
                mac.update(id.as_bytes());
                mac.update(b".");
                mac.update(timestamp.to_string().as_bytes());
                mac.update(b".");
                mac.update(body);
                format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn decode(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret.strip_prefix(PREFIX).ok_or(SecretError::Prefix)?;
    let key = STANDARD.decode(encoded).map_err(|_| SecretError::Base64)?;
    if !(24..=64).contains(&key.len()) {
        return Err(SecretError::Length(key.len()));
    }
    Ok(key)
}

/// A fresh secret from the operating system's random source.
pub fn new_secret() -> String {
    let key: Vec<u8> = (0..NEW_KEY_BYTES).map(|_| rand_byte()).collect();
    format!("{PREFIX}{}", STANDARD.encode(key))
}

/// One byte from the OS's random source: uuid's v4 generator reads getrandom, which is what a
/// key wants (fastrand is not cryptographic).
fn rand_byte() -> u8 {
    uuid::Uuid::new_v4().as_bytes()[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector the official libraries test against; the Python `standardwebhooks` package
    /// signs it the same way.
    #[test]
    fn signs_the_reference_vector() {
        let keys = SigningKeys::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            keys.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn signs_with_every_secret_during_a_rotation() {
        let old = new_secret();
        let new = new_secret();
        let both = SigningKeys::parse(&format!("{new}, {old}")).unwrap();
        let alone = |s: &str| SigningKeys::parse(s).unwrap().sign("m", 1, b"{}");
        assert_eq!(
            both.sign("m", 1, b"{}"),
            format!("{} {}", alone(&new), alone(&old))
        );
    }

    #[test]
    fn refuses_what_is_not_a_secret() {
        let parse = |s: &str| SigningKeys::parse(s).map(|_| ());
        assert_eq!(parse(""), Err(SecretError::Prefix));
        assert_eq!(
            parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::Prefix)
        );
        assert_eq!(parse("whsec_not base64!"), Err(SecretError::Base64));
        assert_eq!(parse("whsec_c2hvcnQ="), Err(SecretError::Length(5)));
        assert!(parse(&new_secret()).is_ok());
    }

    #[test]
    fn new_secrets_differ_and_hold_32_bytes() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert_eq!(decode(&a).unwrap().len(), 32);
    }

    #[test]
    fn debug_shows_no_key() {
        let keys = SigningKeys::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(format!("{keys:?}"), "SigningKeys(1 [REDACTED])");
    }
}
