//! Authentication of the app's signed-in users: Supabase-compatible JWTs, either HS256 with a
//! shared secret or ES256/RS256 keys from a JWKS URL (chosen by `kid`). The algorithm is pinned
//! by the key, never taken from the token alone: `alg: none` and algorithm confusion fail.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use jsonwebtoken::{
    decode, decode_header,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm},
    Algorithm, DecodingKey, Validation,
};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

use crate::{
    config::JwtConfig,
    domain::{Email, UserId},
};

/// Who a verified token says the caller is.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthenticatedUser {
    pub id: UserId,
    pub email: Option<Email>,
    /// A boolean `email_verified` claim; `None` for anything else (counted as unverified
    /// for a new user, and never changing an existing one).
    pub email_verified: Option<bool>,
    /// The `iat` claim (unix seconds), if the token has one.
    pub issued_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    /// Why a token was refused: for the logs only, never for the client.
    #[error("token rejected: {0}")]
    Rejected(String),
    /// The signing keys could not be fetched, so the token could not be checked.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
}

#[derive(Deserialize)]
struct TokenClaims {
    sub: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<serde_json::Value>,
    #[serde(default)]
    iat: Option<serde_json::Value>,
}

pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    jwks: Option<JwksKeys>,
    audience: String,
    issuer: Option<String>,
}

impl JwtVerifier {
    /// `None` when neither a secret nor a JWKS URL is configured (user routes are then off).
    pub fn from_config(config: &JwtConfig) -> Option<Arc<Self>> {
        if config.secret.is_none() && config.jwks_url.is_none() {
            return None;
        }
        Some(Arc::new(Self {
            hs256: config
                .secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose().as_bytes())),
            jwks: config.jwks_url.as_ref().map(|url| JwksKeys {
                url: url.clone(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("a plain HTTP client builds"),
                cache: RwLock::default(),
                refreshing: Mutex::new(()),
                min_refresh: config.jwks_min_refresh,
                max_age: config.jwks_max_age,
            }),
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
        }))
    }

    pub async fn verify(&self, token: &str) -> Result<AuthenticatedUser, AuthError> {
        let header =
            decode_header(token).map_err(|e| AuthError::Rejected(format!("header: {e}")))?;
        let (key, algorithm) = match header.alg {
            Algorithm::HS256 => (
                self.hs256
                    .clone()
                    .ok_or_else(|| AuthError::Rejected("HS256 is not configured".into()))?,
                Algorithm::HS256,
            ),
            Algorithm::RS256 | Algorithm::ES256 => {
                let jwks = self
                    .jwks
                    .as_ref()
                    .ok_or_else(|| AuthError::Rejected("no JWKS is configured".into()))?;
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or_else(|| AuthError::Rejected("no kid".into()))?;
                let (key, algorithm) = jwks.key(kid).await?;
                if algorithm != header.alg {
                    return Err(AuthError::Rejected(format!(
                        "alg {:?} does not match key {kid} ({algorithm:?})",
                        header.alg
                    )));
                }
                (key, algorithm)
            }
            other => return Err(AuthError::Rejected(format!("alg {other:?} not accepted"))),
        };

        let mut validation = Validation::new(algorithm);
        validation.leeway = 30;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.audience]);
        let mut required = vec!["exp", "sub", "aud"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let claims = decode::<TokenClaims>(token, &key, &validation)
            .map_err(|e| AuthError::Rejected(format!("{e}")))?
            .claims;
        Ok(AuthenticatedUser {
            id: UserId::parse(&claims.sub).map_err(|e| AuthError::Rejected(e.message))?,
            email: claims.email.as_deref().and_then(|e| Email::parse(e).ok()),
            email_verified: claims.email_verified.as_ref().and_then(|v| v.as_bool()),
            issued_at: claims.iat.as_ref().and_then(|v| v.as_i64()),
        })
    }
}

/// Public keys from the JWKS URL, by `kid`. Refetched when older than `max_age`, or when a
/// token names an unknown `kid` (key rotation) but at most every `min_refresh`.
struct JwksKeys {
    url: String,
    http: reqwest::Client,
    cache: RwLock<KeyCache>,
    /// One fetch at a time; the others wait for its result.
    refreshing: Mutex<()>,
    min_refresh: Duration,
    max_age: Duration,
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    fetched_at: Option<Instant>,
}

impl JwksKeys {
    async fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm), AuthError> {
        {
            let cache = self.cache.read().await;
            let fresh = cache
                .fetched_at
                .is_some_and(|at| at.elapsed() < self.max_age);
            if let (true, Some(found)) = (fresh, cache.keys.get(kid)) {
                return Ok(found.clone());
            }
        }
        let _one_fetch = self.refreshing.lock().await;
        {
            // Someone else may have fetched while we waited; and unknown kids must not turn
            // into a fetch per request.
            let cache = self.cache.read().await;
            let recent = cache
                .fetched_at
                .is_some_and(|at| at.elapsed() < self.min_refresh);
            let fresh = cache
                .fetched_at
                .is_some_and(|at| at.elapsed() < self.max_age);
            match cache.keys.get(kid) {
                Some(found) if fresh => return Ok(found.clone()),
                None if recent => return Err(AuthError::Rejected(format!("unknown kid {kid}"))),
                _ => {}
            }
        }
        let keys = self.fetch().await?;
        let mut cache = self.cache.write().await;
        cache.keys = keys;
        cache.fetched_at = Some(Instant::now());
        cache
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| AuthError::Rejected(format!("unknown kid {kid}")))
    }

    async fn fetch(&self) -> Result<HashMap<String, (DecodingKey, Algorithm)>, AuthError> {
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<serde_json::Value>,
        }
        let unavailable =
            |e: reqwest::Error| AuthError::KeysUnavailable(e.without_url().to_string());
        let set: RawSet = self
            .http
            .get(&self.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)?;
        let mut keys = HashMap::new();
        // A key billsync cannot use (another type or algorithm) is skipped, not fatal.
        for raw in set.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
                continue;
            };
            let (Some(kid), Some(algorithm)) = (jwk.common.key_id.clone(), signing_algorithm(&jwk))
            else {
                continue;
            };
            if let Ok(key) = DecodingKey::from_jwk(&jwk) {
                keys.insert(kid, (key, algorithm));
            }
        }
        tracing::info!(keys = keys.len(), "fetched JWKS");
        Ok(keys)
    }
}

/// The one algorithm a JWK may verify: its declared `alg`, or the usual one for its type.
fn signing_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    match (&jwk.common.key_algorithm, &jwk.algorithm) {
        (Some(KeyAlgorithm::RS256), AlgorithmParameters::RSA(_)) => Some(Algorithm::RS256),
        (Some(KeyAlgorithm::ES256), AlgorithmParameters::EllipticCurve(ec))
            if ec.curve == EllipticCurve::P256 =>
        {
            Some(Algorithm::ES256)
        }
        (None, AlgorithmParameters::RSA(_)) => Some(Algorithm::RS256),
        (None, AlgorithmParameters::EllipticCurve(ec)) if ec.curve == EllipticCurve::P256 => {
            Some(Algorithm::ES256)
        }
        _ => None,
    }
}
