//! Every setting, declared once: each section is one struct that clap fills from flags and
//! environment variables and serde fills from the TOML file (a field's name is its TOML key,
//! its flag in kebab case). Every field is optional at this stage: [`Layer::over`] stacks the
//! sources, then each section resolves itself into its validated settings, defaults filled in.

use std::{net::SocketAddr, time::Duration};

use super::{
    is_loopback_url, parse_origin, ConfigError, JwtConfig, OutboxConfig, Quota, Secret,
    ServerLimits, StripeConfig, UserLimitsConfig, WebhookConfig, DEFAULT_DATABASE_URL,
    DEFAULT_LISTEN, DEFAULT_STRIPE_API_BASE, DEFAULT_STRIPE_API_VERSION,
};

/// One source of settings, layered over a lower one field by field: a field this source
/// sets wins, one it leaves unset falls through.
pub trait Layer: Sized {
    fn over(self, lower: Self) -> Self;
}

/// A section of settings as the TOML file holds it: flat keys, named like its fields.
pub trait FileSection: Sized {
    /// The section's TOML keys.
    const KEYS: &'static [&'static str];

    /// Takes this section's keys out of the file's table; the keys left belong to others.
    fn take(table: &mut toml::Table) -> Result<Self, toml::de::Error>
    where
        Self: serde::de::DeserializeOwned,
    {
        let mine: toml::Table = Self::KEYS
            .iter()
            .filter_map(|key| table.remove(*key).map(|value| ((*key).to_owned(), value)))
            .collect();
        mine.try_into()
    }
}

/// Declares a section: the struct with its clap and serde derives, its TOML keys, and its
/// field-by-field [`Layer`], from one list of fields.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident: Option<$type:ty>, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default, Clone, clap::Args, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: Option<$type>, )*
        }

        impl FileSection for $name {
            const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];
        }

        impl Layer for $name {
            fn over(self, lower: Self) -> Self {
                Self { $( $field: self.$field.or(lower.$field), )* }
            }
        }
    };
}

section! {
    /// Where the data lives.
    pub struct DatabaseSettings {
        /// postgres://… or sqlite://… [default: sqlite://./billsync.db]
        #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
        pub database_url: Option<Secret>,
        /// Maximum database connections in the pool [default: 16]
        #[arg(long, env = "BILLSYNC_DB_MAX_CONNECTIONS", global = true)]
        pub db_max_connections: Option<u32>,
        /// Seconds a Postgres instance may serve a customer link from memory; changes evict it at
        /// once through LISTEN/NOTIFY, this bounds staleness if a notification is lost (0 = off) [default: 60]
        #[arg(long, env = "BILLSYNC_LINK_CACHE_TTL_SECS", global = true)]
        pub link_cache_ttl_secs: Option<u64>,
    }
}

/// The database's settings, validated.
pub struct Database {
    pub url: Secret,
    pub max_connections: u32,
    pub link_cache_ttl: Duration,
}

impl DatabaseSettings {
    pub fn resolve(self) -> Result<Database, ConfigError> {
        let url = self
            .database_url
            .unwrap_or_else(|| Secret::new(DEFAULT_DATABASE_URL));
        if !["postgres://", "postgresql://", "sqlite:"]
            .iter()
            .any(|scheme| url.expose().starts_with(scheme))
        {
            return Err(invalid(
                "DATABASE_URL must start with postgres://, postgresql:// or sqlite:",
            ));
        }
        let max_connections = self.db_max_connections.unwrap_or(16);
        if max_connections == 0 {
            return Err(invalid("BILLSYNC_DB_MAX_CONNECTIONS must be at least 1"));
        }
        Ok(Database {
            url,
            max_connections,
            link_cache_ttl: Duration::from_secs(self.link_cache_ttl_secs.unwrap_or(60)),
        })
    }
}

section! {
    /// The HTTP server: where it listens and what it allows a client.
    pub struct HttpSettings {
        /// Address the HTTP server listens on [default: 127.0.0.1:8080]
        #[arg(long, env = "BILLSYNC_LISTEN", global = true)]
        pub listen: Option<String>,
        /// Seconds a client has to send a request's headers; slower connections are closed [default: 10]
        #[arg(long, env = "BILLSYNC_HEADER_READ_TIMEOUT_SECS", global = true)]
        pub header_read_timeout_secs: Option<u64>,
        /// Seconds a client has to send a request's whole body (else 408) [default: 30]
        #[arg(long, env = "BILLSYNC_BODY_READ_TIMEOUT_SECS", global = true)]
        pub body_read_timeout_secs: Option<u64>,
        /// Connections served at once; more wait until one closes [default: 1024]
        #[arg(long, env = "BILLSYNC_MAX_CONNECTIONS", global = true)]
        pub max_connections: Option<usize>,
        /// Browser origins allowed to call the user routes (exact, comma-separated, e.g.
        /// https://app.example.com); none by default.
        #[arg(long, env = "BILLSYNC_CORS_ORIGINS", global = true)]
        pub cors_origins: Option<String>,
    }
}

/// The HTTP server's settings, validated.
pub struct Http {
    pub listen: SocketAddr,
    pub server: ServerLimits,
    pub body_read_timeout: Duration,
    pub cors_origins: Vec<String>,
}

impl HttpSettings {
    pub fn resolve(self) -> Result<Http, ConfigError> {
        let listen_raw = self.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_raw.parse().map_err(|_| {
            invalid(format!(
                "BILLSYNC_LISTEN must be an address like 127.0.0.1:8080, got {listen_raw:?}"
            ))
        })?;
        let cors_origins = comma_separated(self.cors_origins.as_deref())
            .map(parse_origin)
            .collect::<Result<Vec<_>, _>>()?;
        let positive = |value: Option<u64>, default: u64, name: &str| match value.unwrap_or(default)
        {
            0 => Err(invalid(format!("{name} must be positive"))),
            secs => Ok(Duration::from_secs(secs)),
        };
        let header_read_timeout = positive(
            self.header_read_timeout_secs,
            10,
            "BILLSYNC_HEADER_READ_TIMEOUT_SECS",
        )?;
        let body_read_timeout = positive(
            self.body_read_timeout_secs,
            30,
            "BILLSYNC_BODY_READ_TIMEOUT_SECS",
        )?;
        let max_connections = self.max_connections.unwrap_or(1024);
        if max_connections == 0 {
            return Err(invalid("BILLSYNC_MAX_CONNECTIONS must be at least 1"));
        }
        Ok(Http {
            listen,
            server: ServerLimits {
                header_read_timeout,
                max_connections,
            },
            body_read_timeout,
            cors_origins,
        })
    }
}

section! {
    /// The Stripe API: the key, where and how billsync calls it, and how fast.
    pub struct StripeSettings {
        /// Stripe secret or restricted key (sk_… or rk_…).
        #[arg(long, env = "STRIPE_SECRET_KEY", global = true, hide_env_values = true)]
        pub stripe_secret_key: Option<Secret>,
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
        /// Stripe requests per second a reconciliation may make (Stripe's test mode allows 25) [default: 20]
        #[arg(long, env = "BILLSYNC_STRIPE_RPS", global = true)]
        pub stripe_rps: Option<u32>,
        /// Stripe requests per second this process sends at most, all its work together (retries
        /// included); what a person waits for goes first [default: 20]
        #[arg(long, env = "BILLSYNC_STRIPE_BUDGET_RPS", global = true)]
        pub stripe_budget_rps: Option<u32>,
    }
}

/// The Stripe settings, validated.
pub struct Stripe {
    pub client: StripeConfig,
    /// Request rate of a reconciliation's Stripe calls.
    pub reconcile_rps: u32,
}

impl StripeSettings {
    pub fn resolve(self) -> Result<Stripe, ConfigError> {
        let api_base = self
            .stripe_api_base
            .unwrap_or_else(|| DEFAULT_STRIPE_API_BASE.to_owned());
        if !(api_base.starts_with("https://") || api_base.starts_with("http://")) {
            return Err(invalid(format!(
                "BILLSYNC_STRIPE_API_BASE must be an http(s) URL, got {api_base:?}"
            )));
        }
        let timeout = match self.stripe_timeout_ms.unwrap_or(10_000) {
            0 => return Err(invalid("BILLSYNC_STRIPE_TIMEOUT_MS must be positive")),
            ms => Duration::from_millis(ms),
        };
        let rate = |value: Option<u32>, name: &str| {
            let rps = value.unwrap_or(20);
            if (1..=1_000).contains(&rps) {
                Ok(rps)
            } else {
                Err(invalid(format!(
                    "{name} must be between 1 and 1000, got {rps}"
                )))
            }
        };
        let reconcile_rps = rate(self.stripe_rps, "BILLSYNC_STRIPE_RPS")?;
        let budget_rps = rate(self.stripe_budget_rps, "BILLSYNC_STRIPE_BUDGET_RPS")?;
        Ok(Stripe {
            client: StripeConfig {
                secret_key: self.stripe_secret_key.filter(|k| !k.expose().is_empty()),
                api_base: api_base.trim_end_matches('/').to_owned(),
                api_version: self
                    .stripe_api_version
                    .unwrap_or_else(|| DEFAULT_STRIPE_API_VERSION.to_owned()),
                timeout,
                connect_timeout: timeout.min(Duration::from_secs(5)),
                max_retries: self.stripe_max_retries.unwrap_or(2),
                retry_base_delay: Duration::from_millis(250),
                retry_max_delay: Duration::from_secs(10),
                budget_rps,
            },
            reconcile_rps,
        })
    }
}

section! {
    /// Who may call: the admin key and the user tokens' checks.
    pub struct AuthSettings {
        /// Bearer key for the admin API (/v1/…); admin routes answer 503 while unset.
        #[arg(long, env = "BILLSYNC_ADMIN_API_KEY", global = true, hide_env_values = true)]
        pub admin_api_key: Option<Secret>,
        /// HS256 secret of the app's user JWTs (Supabase: the project's JWT secret).
        #[arg(long, env = "BILLSYNC_JWT_SECRET", global = true, hide_env_values = true)]
        pub jwt_secret: Option<Secret>,
        /// JWKS URL for ES256/RS256 user JWTs (Supabase: …/auth/v1/.well-known/jwks.json).
        #[arg(long, env = "BILLSYNC_JWKS_URL", global = true)]
        pub jwks_url: Option<String>,
        /// Required `aud` of user JWTs [default: authenticated]
        #[arg(long, env = "BILLSYNC_JWT_AUDIENCE", global = true)]
        pub jwt_audience: Option<String>,
        /// Required `iss` of user JWTs, when set.
        #[arg(long, env = "BILLSYNC_JWT_ISSUER", global = true)]
        pub jwt_issuer: Option<String>,
    }
}

/// The callers' credentials, validated.
pub struct Auth {
    pub admin_api_key: Option<Secret>,
    pub jwt: JwtConfig,
}

impl AuthSettings {
    pub fn resolve(self) -> Result<Auth, ConfigError> {
        let admin_api_key = non_empty_secret(self.admin_api_key);
        if admin_api_key
            .as_ref()
            .is_some_and(|k| k.expose().len() < 16)
        {
            return Err(invalid(
                "BILLSYNC_ADMIN_API_KEY must be at least 16 characters",
            ));
        }
        let secret = non_empty_secret(self.jwt_secret);
        if secret.as_ref().is_some_and(|s| s.expose().len() < 32) {
            return Err(invalid(
                "BILLSYNC_JWT_SECRET must be at least 32 characters",
            ));
        }
        let jwks_url = self.jwks_url.filter(|u| !u.is_empty());
        if let Some(url) = &jwks_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid(format!(
                    "BILLSYNC_JWKS_URL must be an http(s) URL, got {url:?}"
                )));
            }
            // Keys fetched in clear text could be swapped on the way: only on this machine.
            if url.starts_with("http://") && !is_loopback_url(url) {
                return Err(invalid(format!(
                    "BILLSYNC_JWKS_URL must be https:// (http:// only on loopback), got {url:?}"
                )));
            }
        }
        Ok(Auth {
            admin_api_key,
            jwt: JwtConfig {
                secret,
                jwks_url,
                audience: self
                    .jwt_audience
                    .unwrap_or_else(|| "authenticated".to_owned()),
                issuer: self.jwt_issuer.filter(|i| !i.is_empty()),
                jwks_min_refresh: Duration::from_secs(10),
                jwks_max_age: Duration::from_secs(600),
                jwks_stale_max: Duration::from_secs(24 * 3600),
                jwks_fetch_timeout: Duration::from_secs(5),
            },
        })
    }
}

section! {
    /// The billing portal the user routes open.
    pub struct PortalSettings {
        /// The app's base URL; the billing portal returns to `${APP_URL}/billing`.
        #[arg(long, env = "APP_URL", global = true)]
        pub app_url: Option<String>,
        /// Billing-portal configuration used for portal sessions (bpc_…); Stripe's default when unset.
        #[arg(long, env = "STRIPE_PORTAL_CONFIGURATION_ID", global = true)]
        pub stripe_portal_configuration_id: Option<String>,
    }
}

/// The portal's settings, validated.
pub struct Portal {
    pub app_url: Option<String>,
    pub configuration_id: Option<String>,
}

impl PortalSettings {
    pub fn resolve(self) -> Result<Portal, ConfigError> {
        let app_url = self
            .app_url
            .filter(|u| !u.is_empty())
            .map(|u| u.trim_end_matches('/').to_owned());
        if let Some(url) = &app_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid(format!(
                    "APP_URL must be an http(s) URL, got {url:?}"
                )));
            }
        }
        Ok(Portal {
            app_url,
            configuration_id: self
                .stripe_portal_configuration_id
                .filter(|c| !c.is_empty()),
        })
    }
}

section! {
    /// Erasure: how erased users are remembered without their ids.
    pub struct ErasureSettings {
        /// Secret key of the erasure tombstones' hash (at least 32 characters) [default: one
        /// generated at first use and kept in the database]
        #[arg(long, env = "BILLSYNC_ERASURE_PEPPER", global = true, hide_env_values = true)]
        pub erasure_pepper: Option<Secret>,
    }
}

impl ErasureSettings {
    /// The pepper, when one is configured.
    pub fn resolve(self) -> Result<Option<Secret>, ConfigError> {
        let pepper = non_empty_secret(self.erasure_pepper);
        if pepper.as_ref().is_some_and(|s| s.expose().len() < 32) {
            return Err(invalid(
                "BILLSYNC_ERASURE_PEPPER must be at least 32 characters",
            ));
        }
        Ok(pepper)
    }
}

section! {
    /// The outbox: the queue of Stripe jobs (profile pushes, erasure steps) and its retries.
    pub struct OutboxSettings {
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
    }
}

impl OutboxSettings {
    /// `stripe_timeout` bounds one Stripe attempt, which a job's lease must outlast.
    pub fn resolve(self, stripe_timeout: Duration) -> Result<OutboxConfig, ConfigError> {
        let max_attempts = self.outbox_max_attempts.unwrap_or(10);
        if max_attempts == 0 {
            return Err(invalid("BILLSYNC_OUTBOX_MAX_ATTEMPTS must be at least 1"));
        }
        let lease = match self.outbox_lease_secs {
            Some(secs) if Duration::from_secs(secs) <= stripe_timeout * 2 => {
                return Err(invalid(format!(
                    "BILLSYNC_OUTBOX_LEASE_SECS must be more than twice the Stripe timeout \
                     ({} ms), or jobs still running are taken over",
                    stripe_timeout.as_millis()
                )))
            }
            Some(secs) => Duration::from_secs(secs),
            None => stripe_timeout * 4 + Duration::from_secs(30),
        };
        Ok(OutboxConfig {
            max_attempts,
            poll_interval: Duration::from_millis(self.outbox_poll_ms.unwrap_or(250).max(1)),
            debounce: Duration::from_millis(self.outbox_debounce_ms.unwrap_or(300)),
            backoff_base: Duration::from_millis(
                self.outbox_backoff_base_ms.unwrap_or(1_000).max(1),
            ),
            backoff_max: Duration::from_secs(600),
            lease,
            batch: 32,
        })
    }
}

section! {
    /// Stripe's webhooks: their signatures, and how long their events are kept.
    pub struct WebhookSettings {
        /// Webhook signing secrets (whsec_…), comma-separated: several during a rotation.
        #[arg(long, env = "STRIPE_WEBHOOK_SECRET", global = true, hide_env_values = true)]
        pub stripe_webhook_secret: Option<Secret>,
        /// How far a webhook's signed timestamp may be from now, in seconds [default: 300]
        #[arg(long, env = "BILLSYNC_WEBHOOK_TOLERANCE_SECS", global = true)]
        pub webhook_tolerance_secs: Option<u64>,
        /// Days applied and skipped events are kept (failed and pending ones are kept) [default: 30]
        #[arg(long, env = "BILLSYNC_EVENT_RETENTION_DAYS", global = true)]
        pub event_retention_days: Option<u32>,
    }
}

impl WebhookSettings {
    pub fn resolve(self) -> Result<WebhookConfig, ConfigError> {
        let secrets: Vec<Secret> =
            comma_separated(self.stripe_webhook_secret.as_ref().map(Secret::expose))
                .map(Secret::new)
                .collect();
        if secrets.iter().any(|s| !s.expose().starts_with("whsec_")) {
            return Err(invalid(
                "STRIPE_WEBHOOK_SECRET must be whsec_… secrets, comma-separated",
            ));
        }
        Ok(WebhookConfig {
            secrets,
            tolerance_secs: self.webhook_tolerance_secs.unwrap_or(300),
            writers: 2,
            max_batch: 256,
            retention: Duration::from_secs(
                86_400 * u64::from(self.event_retention_days.unwrap_or(30)),
            ),
        })
    }
}

section! {
    /// Per-user limits of the user routes that call Stripe while the person waits.
    pub struct UserLimitSettings {
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
    }
}

impl UserLimitSettings {
    pub fn resolve(self) -> Result<UserLimitsConfig, ConfigError> {
        Ok(UserLimitsConfig {
            portal: quota(
                self.user_portal_burst,
                self.user_portal_interval_secs,
                (5, 12),
                "PORTAL",
            )?,
            export: quota(
                self.user_export_burst,
                self.user_export_interval_secs,
                (1, 300),
                "EXPORT",
            )?,
            delete: quota(
                self.user_delete_burst,
                self.user_delete_interval_secs,
                (3, 60),
                "DELETE",
            )?,
        })
    }
}

/// One route's bucket; `route` names its settings, `BILLSYNC_USER_<route>_…`.
fn quota(
    burst: Option<u32>,
    interval_secs: Option<u64>,
    (default_burst, default_secs): (u32, u64),
    route: &str,
) -> Result<Quota, ConfigError> {
    let burst = burst.unwrap_or(default_burst);
    if !(1..=1_000).contains(&burst) {
        return Err(invalid(format!(
            "BILLSYNC_USER_{route}_BURST must be between 1 and 1000, got {burst}"
        )));
    }
    let secs = interval_secs.unwrap_or(default_secs);
    if !(1..=86_400).contains(&secs) {
        return Err(invalid(format!(
            "BILLSYNC_USER_{route}_INTERVAL_SECS must be between 1 and 86400, got {secs}"
        )));
    }
    Ok(Quota {
        burst,
        interval: Duration::from_secs(secs),
    })
}

section! {
    /// What this process does besides serving HTTP, and how it logs.
    pub struct InstanceSettings {
        /// Whether `serve` also runs the outbox worker and the event applier. `false` makes an
        /// instance that only serves HTTP (webhooks are stored, not applied), for deployments
        /// that apply events in other instances on the same Postgres [default: true]
        #[arg(long, env = "BILLSYNC_RUN_WORKERS", global = true)]
        pub run_workers: Option<bool>,
        /// Log output: pretty or json (one object per line, request id on each) [default: pretty]
        #[arg(long, env = "BILLSYNC_LOG_FORMAT", global = true)]
        pub log_format: Option<String>,
    }
}

/// The instance's settings, validated.
pub struct Instance {
    pub run_workers: bool,
    pub log_format: crate::telemetry::LogFormat,
}

impl InstanceSettings {
    /// `database_url` decides whether an instance may leave the workers to others.
    pub fn resolve(self, database_url: &Secret) -> Result<Instance, ConfigError> {
        let log_format = self
            .log_format
            .map(|f| f.parse().map_err(ConfigError::Invalid))
            .transpose()?
            .unwrap_or_default();
        let run_workers = self.run_workers.unwrap_or(true);
        if !run_workers && database_url.expose().starts_with("sqlite:") {
            return Err(invalid(
                "BILLSYNC_RUN_WORKERS=false needs Postgres: a SQLite database is served by one \
                 process, which must also apply its events and push its changes",
            ));
        }
        Ok(Instance {
            run_workers,
            log_format,
        })
    }
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

/// An unset or empty secret is no secret.
fn non_empty_secret(secret: Option<Secret>) -> Option<Secret> {
    secret.filter(|s| !s.expose().is_empty())
}

/// The trimmed, non-empty items of a comma-separated list.
fn comma_separated(list: Option<&str>) -> impl Iterator<Item = &str> {
    list.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

section! {
    /// Events towards the app: where they are delivered, how they are signed and retried.
    pub struct AppEventSettings {
        /// The app's endpoint for app events (https://…, or http:// on loopback); unset: events
        /// are only kept for `GET /v1/app-events`.
        #[arg(long, env = "BILLSYNC_APP_WEBHOOK_URL", global = true, hide_env_values = true)]
        pub app_webhook_url: Option<Secret>,
        /// Standard Webhooks signing secrets (whsec_ + base64), comma-separated: every one signs
        /// each delivery, for a rotation. `billsync app-events new-secret` makes one.
        #[arg(long, env = "BILLSYNC_APP_WEBHOOK_SECRET", global = true, hide_env_values = true)]
        pub app_webhook_secret: Option<Secret>,
        /// One delivery attempt's time limit, in milliseconds [default: 10000]
        #[arg(long, env = "BILLSYNC_APP_WEBHOOK_TIMEOUT_MS", global = true)]
        pub app_webhook_timeout_ms: Option<u64>,
        /// Deliveries in flight at once (each to a different user) [default: 64]
        #[arg(long, env = "BILLSYNC_APP_WEBHOOK_CONCURRENCY", global = true)]
        pub app_webhook_concurrency: Option<usize>,
        /// First wait before a failed delivery is retried, in milliseconds; doubles per
        /// attempt, with jitter [default: 5000]
        #[arg(long, env = "BILLSYNC_APP_WEBHOOK_BACKOFF_BASE_MS", global = true)]
        pub app_webhook_backoff_base_ms: Option<u64>,
        /// Longest wait between retries, in seconds [default: 3600]
        #[arg(long, env = "BILLSYNC_APP_WEBHOOK_BACKOFF_MAX_SECS", global = true)]
        pub app_webhook_backoff_max_secs: Option<u64>,
        /// How long after its creation an event is retried before it is parked as failed, in
        /// seconds [default: 259200, three days, as Stripe retries]
        #[arg(long, env = "BILLSYNC_APP_WEBHOOK_RETRY_WINDOW_SECS", global = true)]
        pub app_webhook_retry_window_secs: Option<u64>,
        /// How often the deliverer looks for new events, in milliseconds [default: 50]
        #[arg(long, env = "BILLSYNC_APP_EVENTS_POLL_MS", global = true)]
        pub app_events_poll_ms: Option<u64>,
        /// The plans file (TOML): prices to plans, features and limits; unset: nobody has a plan.
        #[arg(long, env = "BILLSYNC_PLANS_FILE", global = true)]
        pub plans_file: Option<std::path::PathBuf>,
    }
}

/// Where and how app events are delivered.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub url: reqwest::Url,
    pub keys: crate::standard_webhooks::SigningKeys,
    /// One attempt's whole exchange, connection to response headers.
    pub timeout: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Waits between attempts: exponential with jitter, from `backoff_base` up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long after its creation an event is still retried; then it is parked as `failed`.
    pub retry_window: Duration,
}

impl DeliveryConfig {
    /// How long a claim protects an event from other deliverers: past one attempt's timeout.
    pub fn lease(&self) -> Duration {
        self.timeout + Duration::from_secs(5)
    }
}

/// App events, validated.
#[derive(Debug, Clone)]
pub struct AppEventsConfig {
    /// `None`: nothing is delivered; events wait for the pull API.
    pub delivery: Option<DeliveryConfig>,
    pub poll_interval: Duration,
    pub plans: std::sync::Arc<crate::plans::Plans>,
}

impl AppEventSettings {
    pub fn resolve(self) -> Result<AppEventsConfig, ConfigError> {
        use crate::standard_webhooks::SigningKeys;
        let url = non_empty_secret(self.app_webhook_url);
        let secret = non_empty_secret(self.app_webhook_secret);
        let delivery = match (url, secret) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "BILLSYNC_APP_WEBHOOK_SECRET must be set with BILLSYNC_APP_WEBHOOK_URL \
                     (billsync app-events new-secret makes one)",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "BILLSYNC_APP_WEBHOOK_URL must be set with BILLSYNC_APP_WEBHOOK_SECRET",
                ))
            }
            (Some(url), Some(secret)) => {
                let raw = url.expose();
                let parsed = reqwest::Url::parse(raw).ok().filter(|u| {
                    u.scheme() == "https" || (u.scheme() == "http" && is_loopback_url(raw))
                });
                let Some(url) = parsed else {
                    return Err(invalid(
                        "BILLSYNC_APP_WEBHOOK_URL must be an https:// URL (http:// only on loopback)",
                    ));
                };
                let keys = SigningKeys::parse(secret.expose())
                    .map_err(|e| invalid(format!("BILLSYNC_APP_WEBHOOK_SECRET: a secret {e}")))?;
                let timeout_ms = self.app_webhook_timeout_ms.unwrap_or(10_000);
                if !(100..=60_000).contains(&timeout_ms) {
                    return Err(invalid(
                        "BILLSYNC_APP_WEBHOOK_TIMEOUT_MS must be between 100 and 60000",
                    ));
                }
                let concurrency = self.app_webhook_concurrency.unwrap_or(64);
                if !(1..=1_024).contains(&concurrency) {
                    return Err(invalid(
                        "BILLSYNC_APP_WEBHOOK_CONCURRENCY must be between 1 and 1024",
                    ));
                }
                let backoff_base =
                    Duration::from_millis(self.app_webhook_backoff_base_ms.unwrap_or(5_000).max(1));
                let backoff_max =
                    Duration::from_secs(self.app_webhook_backoff_max_secs.unwrap_or(3_600).max(1));
                if backoff_max < backoff_base {
                    return Err(invalid(
                        "BILLSYNC_APP_WEBHOOK_BACKOFF_MAX_SECS must not be below the backoff base",
                    ));
                }
                Some(DeliveryConfig {
                    url,
                    keys,
                    timeout: Duration::from_millis(timeout_ms),
                    concurrency,
                    backoff_base,
                    backoff_max,
                    retry_window: Duration::from_secs(
                        self.app_webhook_retry_window_secs.unwrap_or(259_200),
                    ),
                })
            }
        };
        let plans = match &self.plans_file {
            None => crate::plans::Plans::none(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    invalid(format!(
                        "BILLSYNC_PLANS_FILE: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                crate::plans::Plans::parse(&text)
                    .map_err(|e| invalid(format!("BILLSYNC_PLANS_FILE: {e}")))?
            }
        };
        Ok(AppEventsConfig {
            delivery,
            poll_interval: Duration::from_millis(self.app_events_poll_ms.unwrap_or(50).max(1)),
            plans: std::sync::Arc::new(plans),
        })
    }
}
