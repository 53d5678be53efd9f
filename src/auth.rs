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
use tokio::sync::watch;

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
    jwks: Option<Arc<JwksKeys>>,
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
            jwks: config
                .jwks_url
                .as_ref()
                .map(|url| Arc::new(JwksKeys::new(url, config))),
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
                        "alg {:?} does not match key {} ({algorithm:?})",
                        header.alg,
                        kid_for_log(kid)
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

/// Public keys from the JWKS URL, by `kid`. One fetch at a time, shared by every request
/// that waits for it (each gives up after one fetch timeout); keys older than `max_age` are
/// still served while a background refresh replaces them, and for up to `stale_max` while the
/// endpoint fails (stale-if-error); a failed fetch is not retried before its backoff, so a
/// dead endpoint is neither hammered nor waited on by every request.
struct JwksKeys {
    url: String,
    http: reqwest::Client,
    cache: std::sync::RwLock<KeyCache>,
    /// The fetch in flight, if any: its waiters watch for it to end.
    in_flight: std::sync::Mutex<Option<watch::Receiver<bool>>>,
    min_refresh: Duration,
    max_age: Duration,
    stale_max: Duration,
    fetch_timeout: Duration,
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    fetched_at: Option<Instant>,
    /// Consecutive failed fetches, and when the next may start.
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
}

/// A JWKS larger than this is refused (Supabase's has a handful of keys, a few KiB).
const JWKS_MAX_BYTES: usize = 256 * 1024;
/// The first retry after a failed fetch; doubling up to `JWKS_BACKOFF_MAX`.
const JWKS_BACKOFF_BASE: Duration = Duration::from_secs(1);
const JWKS_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What a request can do with the cache as it stands.
enum Lookup {
    Found((DecodingKey, Algorithm)),
    /// Found, but old: serve it and refresh in the background.
    FoundRefresh((DecodingKey, Algorithm)),
    Refuse(AuthError),
    /// Nothing usable: wait for a fetch.
    Fetch,
}

/// A `kid` as it may appear in logs: the token's sender chooses it.
fn kid_for_log(kid: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(kid.as_bytes());
    format!("kid#{} ({} bytes)", hex::encode(&digest[..4]), kid.len())
}

impl JwksKeys {
    fn new(url: &str, config: &JwtConfig) -> Self {
        Self {
            url: url.to_owned(),
            http: reqwest::Client::builder()
                .timeout(config.jwks_fetch_timeout)
                .connect_timeout(config.jwks_fetch_timeout)
                // A redirect could lead the fetch anywhere; the URL is configured exactly.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a plain HTTP client builds"),
            cache: std::sync::RwLock::default(),
            in_flight: std::sync::Mutex::new(None),
            min_refresh: config.jwks_min_refresh,
            max_age: config.jwks_max_age,
            stale_max: config.jwks_stale_max,
            fetch_timeout: config.jwks_fetch_timeout,
        }
    }

    async fn key(self: &Arc<Self>, kid: &str) -> Result<(DecodingKey, Algorithm), AuthError> {
        match self.lookup(kid, true) {
            Lookup::Found(key) => return Ok(key),
            Lookup::FoundRefresh(key) => {
                let _ = self.start_fetch();
                return Ok(key);
            }
            Lookup::Refuse(err) => return Err(err),
            Lookup::Fetch => {}
        }
        let mut done = self.start_fetch();
        if tokio::time::timeout(self.fetch_timeout, done.wait_for(|ended| *ended))
            .await
            .is_err()
        {
            return Err(AuthError::KeysUnavailable(
                "the JWKS fetch timed out".into(),
            ));
        }
        match self.lookup(kid, false) {
            Lookup::Found(key) | Lookup::FoundRefresh(key) => Ok(key),
            Lookup::Refuse(err) => Err(err),
            Lookup::Fetch => Err(self.unavailable()),
        }
    }

    /// `may_fetch` is false after a fetch ended: what the cache now says is final.
    fn lookup(&self, kid: &str, may_fetch: bool) -> Lookup {
        let cache = self.cache.read().expect("JWKS cache lock");
        let now = Instant::now();
        let age = cache.fetched_at.map(|at| now.duration_since(at));
        let backing_off = cache.retry_at.is_some_and(|at| now < at);
        match (cache.keys.get(kid), age) {
            (Some(key), Some(age)) if age < self.max_age * 3 / 4 => Lookup::Found(key.clone()),
            // Refreshed ahead of expiry while it still serves, and served past it while the
            // endpoint fails (stale-if-error).
            (Some(key), Some(age)) if age < self.stale_max => {
                if backing_off || !may_fetch {
                    Lookup::Found(key.clone())
                } else {
                    Lookup::FoundRefresh(key.clone())
                }
            }
            _ if backing_off || !may_fetch => match cache.last_error.as_ref() {
                Some(error) if cache.failures > 0 => {
                    Lookup::Refuse(AuthError::KeysUnavailable(error.clone()))
                }
                _ => Lookup::Refuse(AuthError::Rejected(format!("unknown {}", kid_for_log(kid)))),
            },
            // Unknown kids must not turn into a fetch per request.
            (None, Some(age)) if age < self.min_refresh => {
                Lookup::Refuse(AuthError::Rejected(format!("unknown {}", kid_for_log(kid))))
            }
            _ => Lookup::Fetch,
        }
    }

    fn unavailable(&self) -> AuthError {
        let cache = self.cache.read().expect("JWKS cache lock");
        AuthError::KeysUnavailable(
            cache
                .last_error
                .clone()
                .unwrap_or_else(|| "no JWKS fetched yet".into()),
        )
    }

    /// Joins the fetch in flight, or starts one; the receiver turns true when it ended.
    fn start_fetch(self: &Arc<Self>) -> watch::Receiver<bool> {
        let mut in_flight = self.in_flight.lock().expect("JWKS fetch lock");
        if let Some(running) = in_flight.as_ref() {
            return running.clone();
        }
        let (ended, running) = watch::channel(false);
        *in_flight = Some(running.clone());
        drop(in_flight);
        let keys = self.clone();
        tokio::spawn(async move {
            // The client's timeout bounds the fetch; this bounds a hostile body as well.
            let fetched = match tokio::time::timeout(keys.fetch_timeout, keys.fetch()).await {
                Ok(fetched) => fetched,
                Err(_) => Err("the JWKS fetch timed out".to_owned()),
            };
            keys.store(fetched);
            *keys.in_flight.lock().expect("JWKS fetch lock") = None;
            let _ = ended.send(true);
        });
        running
    }

    fn store(&self, fetched: Result<HashMap<String, (DecodingKey, Algorithm)>, String>) {
        let mut cache = self.cache.write().expect("JWKS cache lock");
        match fetched {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "fetched JWKS");
                cache.keys = keys;
                cache.fetched_at = Some(Instant::now());
                cache.failures = 0;
                cache.retry_at = None;
                cache.last_error = None;
            }
            Err(error) => {
                cache.failures = cache.failures.saturating_add(1);
                let backoff = JWKS_BACKOFF_BASE
                    .saturating_mul(2u32.saturating_pow(cache.failures - 1))
                    .min(JWKS_BACKOFF_MAX);
                tracing::warn!(%error, failures = cache.failures,
                    retry_in_ms = backoff.as_millis() as u64, "JWKS fetch failed");
                cache.retry_at = Some(Instant::now() + backoff);
                cache.last_error = Some(error);
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<serde_json::Value>,
        }
        let unavailable = |e: reqwest::Error| e.without_url().to_string();
        let mut response = self.http.get(&self.url).send().await.map_err(unavailable)?;
        if !response.status().is_success() {
            return Err(format!("the JWKS endpoint answered {}", response.status()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > JWKS_MAX_BYTES as u64)
        {
            return Err("the JWKS is larger than 256 KiB".into());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
            if body.len() + chunk.len() > JWKS_MAX_BYTES {
                return Err("the JWKS is larger than 256 KiB".into());
            }
            body.extend_from_slice(&chunk);
        }
        let set: RawSet =
            serde_json::from_slice(&body).map_err(|e| format!("the JWKS is not a key set: {e}"))?;
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
