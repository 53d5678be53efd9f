//! Configuration: built-in defaults, then an optional TOML file, then environment variables and
//! command-line flags (clap reads both; a flag beats its variable). Validated once at start-up.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

/// A secret string whose `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The only way to read the value: grep for `expose` to audit every use.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

pub const DEFAULT_DATABASE_URL: &str = "sqlite://./billsync.db";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_STRIPE_API_BASE: &str = "https://api.stripe.com";
/// The API version the spec was written against; pinned so Stripe-side upgrades of the
/// account's default version cannot change the shapes billsync parses.
pub const DEFAULT_STRIPE_API_VERSION: &str = "2025-08-27.basil";

/// An exact browser origin: `http(s)://host[:port]`, no path, no wildcard (credentials are
/// allowed on the user routes, and a wildcard with credentials would trust any site).
fn parse_origin(raw: &str) -> Result<String, ConfigError> {
    let invalid = || {
        ConfigError::Invalid(format!(
            "BILLSYNC_CORS_ORIGINS must list exact origins like https://app.example.com, got {raw:?}"
        ))
    };
    let rest = raw
        .strip_prefix("https://")
        .or_else(|| raw.strip_prefix("http://"))
        .ok_or_else(invalid)?;
    let host_ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if !host_ok || rest.starts_with([':', '.']) || rest.ends_with([':', '.']) {
        return Err(invalid());
    }
    Ok(raw.to_ascii_lowercase())
}

/// The password of a `scheme://user:password@host/…` URL.
fn url_password(url: &str) -> Option<&str> {
    let authority = url.split_once("://")?.1.split(['/', '?']).next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    userinfo
        .split_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty())
}

/// Every setting, as a flag and an environment variable. All optional here: defaults and the
/// TOML file fill the gaps in [`Config::load`].
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ConfigArgs {
    /// TOML file with settings (keys as the long flags, with underscores).
    #[arg(long, env = "BILLSYNC_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// postgres://… or sqlite://… [default: sqlite://./billsync.db]
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Maximum database connections in the pool [default: 16]
    #[arg(long, env = "BILLSYNC_DB_MAX_CONNECTIONS", global = true)]
    pub db_max_connections: Option<u32>,
    /// Address the HTTP server listens on [default: 127.0.0.1:8080]
    #[arg(long, env = "BILLSYNC_LISTEN", global = true)]
    pub listen: Option<String>,
    /// Stripe secret or restricted key (sk_… or rk_…).
    #[arg(long, env = "STRIPE_SECRET_KEY", global = true, hide_env_values = true)]
    pub stripe_secret_key: Option<String>,
    /// Stripe API base URL [default: https://api.stripe.com]
    #[arg(long, env = "BILLSYNC_STRIPE_API_BASE", global = true)]
    pub stripe_api_base: Option<String>,
    /// Pinned Stripe-Version header [default: 2025-08-27.basil]
    #[arg(long, env = "BILLSYNC_STRIPE_API_VERSION", global = true)]
    pub stripe_api_version: Option<String>,
    /// Timeout of one Stripe request attempt, in milliseconds [default: 10000]
    #[arg(long, env = "BILLSYNC_STRIPE_TIMEOUT_MS", global = true)]
    pub stripe_timeout_ms: Option<u64>,
    /// Retries after a failed Stripe attempt (connection errors, 409 lock_timeout, 429, 5xx) [default: 2]
    #[arg(long, env = "BILLSYNC_STRIPE_MAX_RETRIES", global = true)]
    pub stripe_max_retries: Option<u32>,
    /// Seconds a Postgres instance may serve a customer link from memory; changes evict it at
    /// once through LISTEN/NOTIFY, this bounds staleness if a notification is lost (0 = off) [default: 60]
    #[arg(long, env = "BILLSYNC_LINK_CACHE_TTL_SECS", global = true)]
    pub link_cache_ttl_secs: Option<u64>,
    /// Bearer key for the admin API (/v1/…); admin routes answer 503 while unset.
    #[arg(
        long,
        env = "BILLSYNC_ADMIN_API_KEY",
        global = true,
        hide_env_values = true
    )]
    pub admin_api_key: Option<String>,
    /// The app's base URL; the billing portal returns to `${APP_URL}/billing`.
    #[arg(long, env = "APP_URL", global = true)]
    pub app_url: Option<String>,
    /// Billing-portal configuration used for portal sessions (bpc_…); Stripe's default when unset.
    #[arg(long, env = "STRIPE_PORTAL_CONFIGURATION_ID", global = true)]
    pub stripe_portal_configuration_id: Option<String>,
    /// HS256 secret of the app's user JWTs (Supabase: the project's JWT secret).
    #[arg(
        long,
        env = "BILLSYNC_JWT_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// Secret key of the erasure tombstones' hash (at least 32 characters) [default: one
    /// generated at first use and kept in the database]
    #[arg(
        long,
        env = "BILLSYNC_ERASURE_PEPPER",
        global = true,
        hide_env_values = true
    )]
    pub erasure_pepper: Option<String>,
    /// JWKS URL for ES256/RS256 user JWTs (Supabase: …/auth/v1/.well-known/jwks.json).
    #[arg(long, env = "BILLSYNC_JWKS_URL", global = true)]
    pub jwks_url: Option<String>,
    /// Required `aud` of user JWTs [default: authenticated]
    #[arg(long, env = "BILLSYNC_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,
    /// Required `iss` of user JWTs, when set.
    #[arg(long, env = "BILLSYNC_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,
    /// Attempts before an outbox job is parked as failed [default: 10]
    #[arg(long, env = "BILLSYNC_OUTBOX_MAX_ATTEMPTS", global = true)]
    pub outbox_max_attempts: Option<u32>,
    /// How often the outbox worker looks for due jobs, in milliseconds [default: 250]
    #[arg(long, env = "BILLSYNC_OUTBOX_POLL_MS", global = true)]
    pub outbox_poll_ms: Option<u64>,
    /// How long a profile push waits for more edits to coalesce, in milliseconds [default: 300]
    #[arg(long, env = "BILLSYNC_OUTBOX_DEBOUNCE_MS", global = true)]
    pub outbox_debounce_ms: Option<u64>,
    /// First retry delay of a failed outbox job, in milliseconds; doubles per attempt [default: 1000]
    #[arg(long, env = "BILLSYNC_OUTBOX_BACKOFF_BASE_MS", global = true)]
    pub outbox_backoff_base_ms: Option<u64>,
    /// Seconds a claimed outbox job is protected; a worker that dies holding one is replaced
    /// after this. Must outlast a job's Stripe calls [default: 4 × the Stripe timeout + 30]
    #[arg(long, env = "BILLSYNC_OUTBOX_LEASE_SECS", global = true)]
    pub outbox_lease_secs: Option<u64>,
    /// Webhook signing secrets (whsec_…), comma-separated: several during a rotation.
    #[arg(
        long,
        env = "STRIPE_WEBHOOK_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub stripe_webhook_secret: Option<String>,
    /// How far a webhook's signed timestamp may be from now, in seconds [default: 300]
    #[arg(long, env = "BILLSYNC_WEBHOOK_TOLERANCE_SECS", global = true)]
    pub webhook_tolerance_secs: Option<u64>,
    /// Days applied and skipped events are kept (failed and pending ones are kept) [default: 30]
    #[arg(long, env = "BILLSYNC_EVENT_RETENTION_DAYS", global = true)]
    pub event_retention_days: Option<u32>,
    /// Stripe requests per second a reconciliation may make (Stripe's test mode allows 25) [default: 20]
    #[arg(long, env = "BILLSYNC_STRIPE_RPS", global = true)]
    pub stripe_rps: Option<u32>,
    /// Stripe requests per second this process sends at most, all its work together (retries
    /// included); what a person waits for goes first [default: 20]
    #[arg(long, env = "BILLSYNC_STRIPE_BUDGET_RPS", global = true)]
    pub stripe_budget_rps: Option<u32>,
    /// Portal sessions one user may create at once before waiting [default: 5]
    #[arg(long, env = "BILLSYNC_USER_PORTAL_BURST", global = true)]
    pub user_portal_burst: Option<u32>,
    /// Seconds after which a user may create one more portal session [default: 12, so 5 a minute]
    #[arg(long, env = "BILLSYNC_USER_PORTAL_INTERVAL_SECS", global = true)]
    pub user_portal_interval_secs: Option<u64>,
    /// Data exports one user may make at once before waiting [default: 1]
    #[arg(long, env = "BILLSYNC_USER_EXPORT_BURST", global = true)]
    pub user_export_burst: Option<u32>,
    /// Seconds after which a user may make one more data export [default: 300]
    #[arg(long, env = "BILLSYNC_USER_EXPORT_INTERVAL_SECS", global = true)]
    pub user_export_interval_secs: Option<u64>,
    /// Account deletions one user may request at once before waiting [default: 3]
    #[arg(long, env = "BILLSYNC_USER_DELETE_BURST", global = true)]
    pub user_delete_burst: Option<u32>,
    /// Seconds after which a user may request one more account deletion [default: 60]
    #[arg(long, env = "BILLSYNC_USER_DELETE_INTERVAL_SECS", global = true)]
    pub user_delete_interval_secs: Option<u64>,
    /// Seconds a client has to send a request's headers; slower connections are closed [default: 10]
    #[arg(long, env = "BILLSYNC_HEADER_READ_TIMEOUT_SECS", global = true)]
    pub header_read_timeout_secs: Option<u64>,
    /// Seconds a client has to send a request's whole body (else 408) [default: 30]
    #[arg(long, env = "BILLSYNC_BODY_READ_TIMEOUT_SECS", global = true)]
    pub body_read_timeout_secs: Option<u64>,
    /// Connections served at once; more wait until one closes [default: 1024]
    #[arg(long, env = "BILLSYNC_MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<usize>,
    /// Whether `serve` also runs the outbox worker and the event applier. `false` makes an
    /// instance that only serves HTTP (webhooks are stored, not applied), for deployments
    /// that apply events in other instances on the same Postgres [default: true]
    #[arg(long, env = "BILLSYNC_RUN_WORKERS", global = true)]
    pub run_workers: Option<bool>,
    /// Log output: pretty or json (one object per line, request id on each) [default: pretty]
    #[arg(long, env = "BILLSYNC_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
    /// Browser origins allowed to call the user routes (exact, comma-separated, e.g.
    /// https://app.example.com); none by default.
    #[arg(long, env = "BILLSYNC_CORS_ORIGINS", global = true)]
    pub cors_origins: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    db_max_connections: Option<u32>,
    listen: Option<String>,
    stripe_secret_key: Option<String>,
    stripe_api_base: Option<String>,
    stripe_api_version: Option<String>,
    stripe_timeout_ms: Option<u64>,
    stripe_max_retries: Option<u32>,
    admin_api_key: Option<String>,
    link_cache_ttl_secs: Option<u64>,
    app_url: Option<String>,
    stripe_portal_configuration_id: Option<String>,
    jwt_secret: Option<String>,
    erasure_pepper: Option<String>,
    jwks_url: Option<String>,
    jwt_audience: Option<String>,
    jwt_issuer: Option<String>,
    outbox_max_attempts: Option<u32>,
    outbox_poll_ms: Option<u64>,
    outbox_debounce_ms: Option<u64>,
    outbox_backoff_base_ms: Option<u64>,
    outbox_lease_secs: Option<u64>,
    stripe_webhook_secret: Option<String>,
    webhook_tolerance_secs: Option<u64>,
    event_retention_days: Option<u32>,
    run_workers: Option<bool>,
    log_format: Option<String>,
    cors_origins: Option<String>,
    stripe_rps: Option<u32>,
    stripe_budget_rps: Option<u32>,
    user_portal_burst: Option<u32>,
    user_portal_interval_secs: Option<u64>,
    user_export_burst: Option<u32>,
    user_export_interval_secs: Option<u64>,
    user_delete_burst: Option<u32>,
    user_delete_interval_secs: Option<u64>,
    header_read_timeout_secs: Option<u64>,
    body_read_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Empty: the webhook route answers 503 `webhooks_disabled`.
    pub secrets: Vec<Secret>,
    pub tolerance_secs: u64,
    /// Group-commit writers and their largest batch.
    pub writers: usize,
    pub max_batch: usize,
    /// Applied and skipped events older than this are pruned.
    pub retention: Duration,
}

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub max_attempts: u32,
    pub poll_interval: Duration,
    pub debounce: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long a claimed job is protected before another worker may take it over.
    pub lease: Duration,
    pub batch: u32,
}

/// Whether an `http://` URL's host is this machine (`localhost`, 127.0.0.0/8, `[::1]`).
fn is_loopback_url(url: &str) -> bool {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host.split(':').next().unwrap_or_default()
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub secret: Option<Secret>,
    pub jwks_url: Option<String>,
    pub audience: String,
    pub issuer: Option<String>,
    /// An unknown `kid` refetches the JWKS at most this often.
    pub jwks_min_refresh: Duration,
    /// Keys are refetched when older than this (in the background, serving the old ones).
    pub jwks_max_age: Duration,
    /// While the JWKS endpoint fails, keys this old are still served (stale-if-error).
    pub jwks_stale_max: Duration,
    /// One JWKS fetch, connection included; a request waits for it at most this long.
    pub jwks_fetch_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct StripeConfig {
    /// Validated lazily: `migrate` needs no key, `serve` refuses to start without one.
    pub secret_key: Option<Secret>,
    pub api_base: String,
    pub api_version: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_retries: u32,
    /// First retry delay; doubles per attempt, with jitter.
    pub retry_base_delay: Duration,
    /// Longest single wait between attempts, including a server's `Retry-After`.
    pub retry_max_delay: Duration,
    /// Attempts per second the process sends at most (its share of the account's limit).
    pub budget_rps: u32,
}

/// The HTTP server's connection limits. Declared here, with the other resolved settings, so
/// that configuration does not depend on the HTTP layer it configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// From a connection's first byte of a request (or its idle keep-alive start) to the end
    /// of the headers.
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// A per-user token bucket: `burst` requests at once, then one more per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub burst: u32,
    pub interval: Duration,
}

/// Per-user limits of the user routes that call Stripe while the person waits.
#[derive(Debug, Clone, Copy)]
pub struct UserLimitsConfig {
    pub portal: Quota,
    pub export: Quota,
    pub delete: Quota,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: Secret,
    pub db_max_connections: u32,
    pub link_cache_ttl: Duration,
    pub listen: SocketAddr,
    pub stripe: StripeConfig,
    pub admin_api_key: Option<Secret>,
    /// Keys the erasure tombstones' hash; `None`: generated once and kept in the database.
    pub erasure_pepper: Option<Secret>,
    /// How long a resolve claim protects a user's customer creation before another
    /// instance may take over (it must outlast the Stripe calls of one resolve).
    pub resolve_lease: Duration,
    pub app_url: Option<String>,
    pub portal_configuration_id: Option<String>,
    pub jwt: JwtConfig,
    pub outbox: OutboxConfig,
    pub webhooks: WebhookConfig,
    pub log_format: crate::telemetry::LogFormat,
    /// Request rate of a reconciliation's Stripe calls.
    pub stripe_rps: u32,
    pub server: ServerLimits,
    /// A request's whole body must arrive within this.
    pub body_read_timeout: Duration,
    /// Exact origins (`https://app.example.com`) allowed to call the user routes from a browser.
    pub cors_origins: Vec<String>,
    /// `serve` runs the outbox worker and the event applier too.
    pub run_workers: bool,
    pub user_limits: UserLimitsConfig,
}

impl Config {
    pub fn load(args: &ConfigArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::ParseFile {
                    path: path.clone(),
                    message: e.message().to_owned(),
                })?
            }
            None => FileConfig::default(),
        };
        fn pick<T: Clone>(flag: &Option<T>, file: Option<T>) -> Option<T> {
            flag.clone().or(file)
        }

        let database_url = pick(&args.database_url, file.database_url)
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        if !(database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://")
            || database_url.starts_with("sqlite:"))
        {
            return Err(ConfigError::Invalid(
                "DATABASE_URL must start with postgres://, postgresql:// or sqlite:".into(),
            ));
        }
        let listen_raw =
            pick(&args.listen, file.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_raw.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "BILLSYNC_LISTEN must be an address like 127.0.0.1:8080, got {listen_raw:?}"
            ))
        })?;
        let db_max_connections =
            pick(&args.db_max_connections, file.db_max_connections).unwrap_or(16);
        if db_max_connections == 0 {
            return Err(ConfigError::Invalid(
                "BILLSYNC_DB_MAX_CONNECTIONS must be at least 1".into(),
            ));
        }
        let api_base = pick(&args.stripe_api_base, file.stripe_api_base)
            .unwrap_or_else(|| DEFAULT_STRIPE_API_BASE.to_owned());
        if !(api_base.starts_with("https://") || api_base.starts_with("http://")) {
            return Err(ConfigError::Invalid(format!(
                "BILLSYNC_STRIPE_API_BASE must be an http(s) URL, got {api_base:?}"
            )));
        }
        let timeout_ms = pick(&args.stripe_timeout_ms, file.stripe_timeout_ms).unwrap_or(10_000);
        if timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "BILLSYNC_STRIPE_TIMEOUT_MS must be positive".into(),
            ));
        }
        let admin_api_key = pick(&args.admin_api_key, file.admin_api_key)
            .filter(|k| !k.is_empty())
            .map(Secret::new);
        if admin_api_key
            .as_ref()
            .is_some_and(|k| k.expose().len() < 16)
        {
            return Err(ConfigError::Invalid(
                "BILLSYNC_ADMIN_API_KEY must be at least 16 characters".into(),
            ));
        }
        let timeout = Duration::from_millis(timeout_ms);
        let app_url = pick(&args.app_url, file.app_url)
            .filter(|u| !u.is_empty())
            .map(|u| u.trim_end_matches('/').to_owned());
        if let Some(url) = &app_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(ConfigError::Invalid(format!(
                    "APP_URL must be an http(s) URL, got {url:?}"
                )));
            }
        }
        let jwt_secret = pick(&args.jwt_secret, file.jwt_secret)
            .filter(|s| !s.is_empty())
            .map(Secret::new);
        if jwt_secret.as_ref().is_some_and(|s| s.expose().len() < 32) {
            return Err(ConfigError::Invalid(
                "BILLSYNC_JWT_SECRET must be at least 32 characters".into(),
            ));
        }
        let erasure_pepper = pick(&args.erasure_pepper, file.erasure_pepper)
            .filter(|s| !s.is_empty())
            .map(Secret::new);
        if erasure_pepper
            .as_ref()
            .is_some_and(|s| s.expose().len() < 32)
        {
            return Err(ConfigError::Invalid(
                "BILLSYNC_ERASURE_PEPPER must be at least 32 characters".into(),
            ));
        }
        let jwks_url = pick(&args.jwks_url, file.jwks_url).filter(|u| !u.is_empty());
        if let Some(url) = &jwks_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(ConfigError::Invalid(format!(
                    "BILLSYNC_JWKS_URL must be an http(s) URL, got {url:?}"
                )));
            }
            // Keys fetched in clear text could be swapped on the way: only on this machine.
            if url.starts_with("http://") && !is_loopback_url(url) {
                return Err(ConfigError::Invalid(format!(
                    "BILLSYNC_JWKS_URL must be https:// (http:// only on loopback), got {url:?}"
                )));
            }
        }
        let max_attempts = pick(&args.outbox_max_attempts, file.outbox_max_attempts).unwrap_or(10);
        if max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "BILLSYNC_OUTBOX_MAX_ATTEMPTS must be at least 1".into(),
            ));
        }
        let outbox = OutboxConfig {
            max_attempts,
            poll_interval: Duration::from_millis(
                pick(&args.outbox_poll_ms, file.outbox_poll_ms)
                    .unwrap_or(250)
                    .max(1),
            ),
            debounce: Duration::from_millis(
                pick(&args.outbox_debounce_ms, file.outbox_debounce_ms).unwrap_or(300),
            ),
            backoff_base: Duration::from_millis(
                pick(&args.outbox_backoff_base_ms, file.outbox_backoff_base_ms)
                    .unwrap_or(1_000)
                    .max(1),
            ),
            backoff_max: Duration::from_secs(600),
            lease: match pick(&args.outbox_lease_secs, file.outbox_lease_secs) {
                Some(secs) if Duration::from_secs(secs) <= timeout * 2 => {
                    return Err(ConfigError::Invalid(format!(
                        "BILLSYNC_OUTBOX_LEASE_SECS must be more than twice the Stripe timeout \
                         ({} ms), or jobs still running are taken over",
                        timeout.as_millis()
                    )))
                }
                Some(secs) => Duration::from_secs(secs),
                None => timeout * 4 + Duration::from_secs(30),
            },
            batch: 32,
        };
        let secrets: Vec<Secret> = pick(&args.stripe_webhook_secret, file.stripe_webhook_secret)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .collect();
        if secrets.iter().any(|s| !s.expose().starts_with("whsec_")) {
            return Err(ConfigError::Invalid(
                "STRIPE_WEBHOOK_SECRET must be whsec_… secrets, comma-separated".into(),
            ));
        }
        let webhooks = WebhookConfig {
            secrets,
            tolerance_secs: pick(&args.webhook_tolerance_secs, file.webhook_tolerance_secs)
                .unwrap_or(300),
            writers: 2,
            max_batch: 256,
            retention: Duration::from_secs(
                86_400
                    * u64::from(
                        pick(&args.event_retention_days, file.event_retention_days).unwrap_or(30),
                    ),
            ),
        };
        let log_format = pick(&args.log_format, file.log_format)
            .map(|f| f.parse().map_err(ConfigError::Invalid))
            .transpose()?
            .unwrap_or_default();
        let cors_origins = pick(&args.cors_origins, file.cors_origins)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(parse_origin)
            .collect::<Result<Vec<_>, _>>()?;
        let stripe_rps = pick(&args.stripe_rps, file.stripe_rps).unwrap_or(20);
        if !(1..=1_000).contains(&stripe_rps) {
            return Err(ConfigError::Invalid(format!(
                "BILLSYNC_STRIPE_RPS must be between 1 and 1000, got {stripe_rps}"
            )));
        }
        let stripe_budget_rps = pick(&args.stripe_budget_rps, file.stripe_budget_rps).unwrap_or(20);
        if !(1..=1_000).contains(&stripe_budget_rps) {
            return Err(ConfigError::Invalid(format!(
                "BILLSYNC_STRIPE_BUDGET_RPS must be between 1 and 1000, got {stripe_budget_rps}"
            )));
        }
        let quota = |burst: Option<u32>,
                     interval: Option<u64>,
                     (default_burst, default_secs): (u32, u64),
                     name: &str|
         -> Result<Quota, ConfigError> {
            let burst = burst.unwrap_or(default_burst);
            if !(1..=1_000).contains(&burst) {
                return Err(ConfigError::Invalid(format!(
                    "BILLSYNC_USER_{name}_BURST must be between 1 and 1000, got {burst}"
                )));
            }
            let secs = interval.unwrap_or(default_secs);
            if !(1..=86_400).contains(&secs) {
                return Err(ConfigError::Invalid(format!(
                    "BILLSYNC_USER_{name}_INTERVAL_SECS must be between 1 and 86400, got {secs}"
                )));
            }
            Ok(Quota {
                burst,
                interval: Duration::from_secs(secs),
            })
        };
        let user_limits = UserLimitsConfig {
            portal: quota(
                pick(&args.user_portal_burst, file.user_portal_burst),
                pick(
                    &args.user_portal_interval_secs,
                    file.user_portal_interval_secs,
                ),
                (5, 12),
                "PORTAL",
            )?,
            export: quota(
                pick(&args.user_export_burst, file.user_export_burst),
                pick(
                    &args.user_export_interval_secs,
                    file.user_export_interval_secs,
                ),
                (1, 300),
                "EXPORT",
            )?,
            delete: quota(
                pick(&args.user_delete_burst, file.user_delete_burst),
                pick(
                    &args.user_delete_interval_secs,
                    file.user_delete_interval_secs,
                ),
                (3, 60),
                "DELETE",
            )?,
        };
        let positive = |value: Option<u64>, default: u64, name: &str| match value.unwrap_or(default)
        {
            0 => Err(ConfigError::Invalid(format!("{name} must be positive"))),
            secs => Ok(Duration::from_secs(secs)),
        };
        let header_read_timeout = positive(
            pick(
                &args.header_read_timeout_secs,
                file.header_read_timeout_secs,
            ),
            10,
            "BILLSYNC_HEADER_READ_TIMEOUT_SECS",
        )?;
        let body_read_timeout = positive(
            pick(&args.body_read_timeout_secs, file.body_read_timeout_secs),
            30,
            "BILLSYNC_BODY_READ_TIMEOUT_SECS",
        )?;
        let max_connections = pick(&args.max_connections, file.max_connections).unwrap_or(1024);
        if max_connections == 0 {
            return Err(ConfigError::Invalid(
                "BILLSYNC_MAX_CONNECTIONS must be at least 1".into(),
            ));
        }
        let run_workers = pick(&args.run_workers, file.run_workers).unwrap_or(true);
        if !run_workers && database_url.starts_with("sqlite:") {
            return Err(ConfigError::Invalid(
                "BILLSYNC_RUN_WORKERS=false needs Postgres: a SQLite database is served by one \
                 process, which must also apply its events and push its changes"
                    .into(),
            ));
        }
        Ok(Self {
            run_workers,
            user_limits,
            webhooks,
            stripe_rps,
            server: ServerLimits {
                header_read_timeout,
                max_connections,
            },
            body_read_timeout,
            log_format,
            cors_origins,
            app_url,
            portal_configuration_id: pick(
                &args.stripe_portal_configuration_id,
                file.stripe_portal_configuration_id,
            )
            .filter(|c| !c.is_empty()),
            jwt: JwtConfig {
                secret: jwt_secret,
                jwks_url,
                audience: pick(&args.jwt_audience, file.jwt_audience)
                    .unwrap_or_else(|| "authenticated".to_owned()),
                issuer: pick(&args.jwt_issuer, file.jwt_issuer).filter(|i| !i.is_empty()),
                jwks_min_refresh: Duration::from_secs(10),
                jwks_max_age: Duration::from_secs(600),
                jwks_stale_max: Duration::from_secs(24 * 3600),
                jwks_fetch_timeout: Duration::from_secs(5),
            },
            outbox,
            database_url: Secret::new(database_url),
            db_max_connections,
            link_cache_ttl: Duration::from_secs(
                pick(&args.link_cache_ttl_secs, file.link_cache_ttl_secs).unwrap_or(60),
            ),
            listen,
            stripe: StripeConfig {
                secret_key: pick(&args.stripe_secret_key, file.stripe_secret_key)
                    .filter(|k| !k.is_empty())
                    .map(Secret::new),
                api_base: api_base.trim_end_matches('/').to_owned(),
                api_version: pick(&args.stripe_api_version, file.stripe_api_version)
                    .unwrap_or_else(|| DEFAULT_STRIPE_API_VERSION.to_owned()),
                timeout,
                connect_timeout: timeout.min(Duration::from_secs(5)),
                max_retries: pick(&args.stripe_max_retries, file.stripe_max_retries).unwrap_or(2),
                retry_base_delay: Duration::from_millis(250),
                retry_max_delay: Duration::from_secs(10),
                budget_rps: stripe_budget_rps,
            },
            admin_api_key,
            erasure_pepper,
            resolve_lease: timeout * 6 + Duration::from_secs(30),
        })
    }

    /// The Stripe key, checked for shape. Commands that talk to Stripe call this first so a
    /// missing or mistyped key stops them with one clear line.
    pub fn stripe_secret_key(&self) -> Result<Secret, ConfigError> {
        let key = self.stripe.secret_key.clone().ok_or_else(|| {
            ConfigError::Invalid(
                "STRIPE_SECRET_KEY is not set (expected an sk_… or rk_… key)".into(),
            )
        })?;
        if !(key.expose().starts_with("sk_") || key.expose().starts_with("rk_")) {
            return Err(ConfigError::Invalid(
                "STRIPE_SECRET_KEY must be a secret (sk_…) or restricted (rk_…) key".into(),
            ));
        }
        Ok(key)
    }

    /// Whether the configured key is a live-mode key (objects from the other mode are ignored).
    pub fn store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            max_connections: self.db_max_connections,
            push_debounce: self.outbox.debounce,
            link_cache_ttl: self.link_cache_ttl,
        }
    }

    /// Every configured secret value, for the log scrubber to redact wherever one appears.
    pub fn secret_values(&self) -> Vec<String> {
        let mut secrets: Vec<String> = [
            self.stripe.secret_key.as_ref(),
            self.admin_api_key.as_ref(),
            self.jwt.secret.as_ref(),
            self.erasure_pepper.as_ref(),
        ]
        .into_iter()
        .flatten()
        .chain(&self.webhooks.secrets)
        .map(|s| s.expose().to_owned())
        .collect();
        if let Some(password) = url_password(self.database_url.expose()) {
            secrets.push(password.to_owned());
        }
        secrets
    }

    pub fn livemode(&self) -> bool {
        self.stripe
            .secret_key
            .as_ref()
            .is_some_and(|k| k.expose().contains("_live_"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_erasure_pepper_is_long_and_secret() {
        let load = |pepper: &str| {
            Config::load(&ConfigArgs {
                erasure_pepper: Some(pepper.into()),
                ..Default::default()
            })
        };
        let err = load("short").unwrap_err().to_string();
        assert!(
            err.contains("BILLSYNC_ERASURE_PEPPER must be at least 32"),
            "{err}"
        );
        let pepper = "p".repeat(32);
        let config = load(&pepper).unwrap();
        assert!(config.secret_values().contains(&pepper));
        assert!(!format!("{config:?}").contains(&pepper));
    }

    #[test]
    fn jwks_urls_are_https_except_on_loopback() {
        let load = |url: &str| {
            Config::load(&ConfigArgs {
                jwks_url: Some(url.into()),
                ..Default::default()
            })
        };
        for good in [
            "https://project.supabase.co/auth/v1/.well-known/jwks.json",
            "http://127.0.0.1:9999/jwks.json",
            "http://localhost/jwks.json",
            "http://[::1]:80/jwks.json",
        ] {
            assert!(load(good).is_ok(), "{good}");
        }
        for bad in [
            "http://project.supabase.co/jwks.json",
            "http://127.0.0.1.evil.example/jwks.json",
            "http://localhost@evil.example/jwks.json",
            "http://10.0.0.1/jwks.json",
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(
                err.contains("BILLSYNC_JWKS_URL must be https://"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn http_only_instances_need_postgres() {
        let load = |database_url: &str, run_workers: Option<bool>| {
            Config::load(&ConfigArgs {
                database_url: Some(database_url.into()),
                run_workers,
                ..Default::default()
            })
        };
        assert!(load("sqlite://x.db", None).unwrap().run_workers);
        let err = load("sqlite://x.db", Some(false)).unwrap_err().to_string();
        assert!(
            err.contains("BILLSYNC_RUN_WORKERS=false needs Postgres"),
            "{err}"
        );
        assert!(!load("postgres://db/x", Some(false)).unwrap().run_workers);
    }

    #[test]
    fn cors_origins_must_be_exact() {
        let load = |origins: &str| {
            Config::load(&ConfigArgs {
                cors_origins: Some(origins.into()),
                ..Default::default()
            })
        };
        assert_eq!(
            load("https://App.example.com, http://localhost:3000")
                .unwrap()
                .cors_origins,
            ["https://app.example.com", "http://localhost:3000"]
        );
        for bad in [
            "*",
            "https://*.example.com",
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "null",
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.contains("BILLSYNC_CORS_ORIGINS"), "{bad}: {err}");
        }
    }

    #[test]
    fn secrets_for_the_log_scrubber_include_the_database_password() {
        let config = Config::load(&ConfigArgs {
            database_url: Some("postgres://billsync:pa55word-xyz@db:5432/billsync".into()),
            stripe_secret_key: Some("sk_test_123456789".into()),
            stripe_webhook_secret: Some("whsec_one,whsec_two".into()),
            ..Default::default()
        })
        .unwrap();
        let secrets = config.secret_values();
        for expected in [
            "pa55word-xyz",
            "sk_test_123456789",
            "whsec_one",
            "whsec_two",
        ] {
            assert!(secrets.iter().any(|s| s == expected), "{expected}");
        }
        assert_eq!(url_password("postgres://postgres@127.0.0.1/x"), None);
        assert_eq!(url_password("sqlite://./billsync.db"), None);
    }

    #[test]
    fn the_stripe_budget_has_a_default_and_refuses_zero_or_absurd_values() {
        let config = Config::load(&ConfigArgs::default()).unwrap();
        assert_eq!(config.stripe.budget_rps, 20);
        for rps in [0, 1_001] {
            let err = Config::load(&ConfigArgs {
                stripe_budget_rps: Some(rps),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with("BILLSYNC_STRIPE_BUDGET_RPS must be"),
                "{err}"
            );
        }
    }

    #[test]
    fn user_limits_have_defaults_and_refuse_zero_or_absurd_values() {
        let limits = Config::load(&ConfigArgs::default()).unwrap().user_limits;
        assert_eq!(
            (limits.portal.burst, limits.portal.interval),
            (5, Duration::from_secs(12))
        );
        assert_eq!(
            (limits.export.burst, limits.export.interval),
            (1, Duration::from_secs(300))
        );
        assert_eq!(
            (limits.delete.burst, limits.delete.interval),
            (3, Duration::from_secs(60))
        );
        type Setter = fn(&mut ConfigArgs);
        let refused: [(&str, Setter); 4] = [
            ("BILLSYNC_USER_PORTAL_BURST", |a| {
                a.user_portal_burst = Some(0)
            }),
            ("BILLSYNC_USER_EXPORT_BURST", |a| {
                a.user_export_burst = Some(1_001)
            }),
            ("BILLSYNC_USER_EXPORT_INTERVAL_SECS", |a| {
                a.user_export_interval_secs = Some(0)
            }),
            ("BILLSYNC_USER_DELETE_INTERVAL_SECS", |a| {
                a.user_delete_interval_secs = Some(86_401)
            }),
        ];
        for (setting, set) in refused {
            let mut args = ConfigArgs::default();
            set(&mut args);
            let err = Config::load(&args).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{setting} must be")), "{err}");
        }
    }

    #[test]
    fn defaults_apply_without_any_configuration() {
        let config = Config::load(&ConfigArgs::default()).unwrap();
        assert_eq!(config.database_url.expose(), DEFAULT_DATABASE_URL);
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.stripe.api_base, DEFAULT_STRIPE_API_BASE);
        assert!(config.admin_api_key.is_none());
        assert!(config
            .stripe_secret_key()
            .unwrap_err()
            .to_string()
            .contains("STRIPE_SECRET_KEY"));
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billsync.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nstripe_max_retries = 5\nstripe_api_base = \"http://127.0.0.1:1/\"\n",
        )
        .unwrap();
        let args = ConfigArgs {
            config: Some(path),
            listen: Some("127.0.0.1:9001".into()),
            ..Default::default()
        };
        let config = Config::load(&args).unwrap();
        assert_eq!(config.listen.port(), 9001);
        assert_eq!(config.stripe.max_retries, 5);
        assert_eq!(config.stripe.api_base, "http://127.0.0.1:1");
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billsync.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let err = Config::load(&ConfigArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");

        let err = Config::load(&ConfigArgs {
            database_url: Some("mysql://x".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"));
    }

    #[test]
    fn stripe_key_shape_is_checked_and_never_printed() {
        let config = Config::load(&ConfigArgs {
            stripe_secret_key: Some("pk_test_publishable".into()),
            ..Default::default()
        })
        .unwrap();
        let err = config.stripe_secret_key().unwrap_err().to_string();
        assert!(err.contains("sk_"), "{err}");
        assert!(!err.contains("pk_test_publishable"));

        let config = Config::load(&ConfigArgs {
            stripe_secret_key: Some("sk_test_supersecret".into()),
            admin_api_key: Some("admin-key-0123456789".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(config.stripe_secret_key().is_ok());
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("supersecret") && !debug.contains("admin-key"),
            "{debug}"
        );
    }
}
