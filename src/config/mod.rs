//! Configuration: built-in defaults, then an optional TOML file, then environment variables and
//! command-line flags (clap reads both; a flag beats its variable). Validated once at start-up.
//!
//! Each setting is declared once, in [`settings`]: one struct per section serves the flags, the
//! variables and the file alike. [`Config::load`] layers the sources and lets each section
//! validate itself into the typed settings below.

mod secret;
pub mod settings;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use secret::Secret;
use settings::{
    AppEventSettings, AuthSettings, DatabaseSettings, ErasureSettings, FileSection, HttpSettings,
    InstanceSettings, Layer, OutboxSettings, PortalSettings, StripeSettings, UserLimitSettings,
    WebhookSettings,
};
pub use settings::{AppEventsConfig, DeliveryConfig};

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

/// Declares the command line's settings and the TOML file's from one list of sections: the
/// struct clap flattens them into, the layering of one source over another, and the file's
/// reading, where every key must belong to a section.
macro_rules! sections {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(#[$config_meta:meta])*
            pub config: Option<PathBuf>,
            $( pub $section:ident: $type:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct $name {
            $(#[$config_meta])*
            pub config: Option<PathBuf>,
            $( #[command(flatten)] pub $section: $type, )*
        }

        impl Layer for $name {
            fn over(self, lower: Self) -> Self {
                Self {
                    config: self.config.or(lower.config),
                    $( $section: self.$section.over(lower.$section), )*
                }
            }
        }

        impl $name {
            /// Every key a TOML file may hold.
            fn file_keys() -> impl Iterator<Item = &'static str> {
                [$(<$type as FileSection>::KEYS),*].into_iter().flatten().copied()
            }

            /// Each section's keys, taken out of the file's table; `table` keeps the rest.
            fn take_sections(table: &mut toml::Table) -> Result<Self, toml::de::Error> {
                Ok(Self {
                    config: None,
                    $( $section: FileSection::take(table)?, )*
                })
            }
        }
    };
}

sections! {
    /// Every setting, by section, as flags and environment variables (clap) or file keys
    /// (serde). All optional here: defaults fill the gaps in [`Config::load`].
    pub struct ConfigArgs {
        /// TOML file with settings (keys as the long flags, with underscores).
        #[arg(long, env = "BILLSYNC_CONFIG", global = true)]
        pub config: Option<PathBuf>,
        pub database: DatabaseSettings,
        pub http: HttpSettings,
        pub stripe: StripeSettings,
        pub auth: AuthSettings,
        pub portal: PortalSettings,
        pub erasure: ErasureSettings,
        pub outbox: OutboxSettings,
        pub webhooks: WebhookSettings,
        pub user_limits: UserLimitSettings,
        pub instance: InstanceSettings,
        pub app_events: AppEventSettings,
    }
}

impl ConfigArgs {
    /// The settings a TOML file holds: flat keys, each a field of one section. A key no
    /// section has is refused, so a typo is not silently ignored.
    fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        let invalid_file = |message: String| ConfigError::ParseFile {
            path: path.to_owned(),
            message,
        };
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| invalid_file(e.message().to_owned()))?;
        let file =
            Self::take_sections(&mut table).map_err(|e| invalid_file(e.message().to_owned()))?;
        match table.keys().next() {
            None => Ok(file),
            // Worded as serde words an unknown field.
            Some(unknown) => Err(invalid_file(format!(
                "unknown field `{unknown}`, expected one of {}",
                Self::file_keys()
                    .map(|key| format!("`{key}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
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
    pub app_events: AppEventsConfig,
}

impl Config {
    /// Flags and variables (`args`) over the file `args.config` names, over the defaults.
    pub fn load(args: &ConfigArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => ConfigArgs::from_file(path)?,
            None => ConfigArgs::default(),
        };
        let settings = args.clone().over(file);
        let database = settings.database.resolve()?;
        let http = settings.http.resolve()?;
        let stripe = settings.stripe.resolve()?;
        let auth = settings.auth.resolve()?;
        let portal = settings.portal.resolve()?;
        let erasure_pepper = settings.erasure.resolve()?;
        let outbox = settings.outbox.resolve(stripe.client.timeout)?;
        let webhooks = settings.webhooks.resolve()?;
        let user_limits = settings.user_limits.resolve()?;
        let instance = settings.instance.resolve(&database.url)?;
        let app_events = settings.app_events.resolve()?;
        Ok(Self {
            resolve_lease: stripe.client.timeout * 6 + Duration::from_secs(30),
            database_url: database.url,
            db_max_connections: database.max_connections,
            link_cache_ttl: database.link_cache_ttl,
            listen: http.listen,
            server: http.server,
            body_read_timeout: http.body_read_timeout,
            cors_origins: http.cors_origins,
            stripe: stripe.client,
            stripe_rps: stripe.reconcile_rps,
            admin_api_key: auth.admin_api_key,
            jwt: auth.jwt,
            app_url: portal.app_url,
            portal_configuration_id: portal.configuration_id,
            erasure_pepper,
            outbox,
            webhooks,
            user_limits,
            run_workers: instance.run_workers,
            log_format: instance.log_format,
            app_events,
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
            plans: self.app_events.plans.clone(),
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
                erasure: settings::ErasureSettings {
                    erasure_pepper: Some(pepper.into()),
                },
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
                auth: settings::AuthSettings {
                    jwks_url: Some(url.into()),
                    ..Default::default()
                },
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
                database: settings::DatabaseSettings {
                    database_url: Some(database_url.into()),
                    ..Default::default()
                },
                instance: settings::InstanceSettings {
                    run_workers,
                    ..Default::default()
                },
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
                http: settings::HttpSettings {
                    cors_origins: Some(origins.into()),
                    ..Default::default()
                },
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
            database: settings::DatabaseSettings {
                database_url: Some("postgres://billsync:pa55word-xyz@db:5432/billsync".into()),
                ..Default::default()
            },
            stripe: settings::StripeSettings {
                stripe_secret_key: Some("sk_test_123456789".into()),
                ..Default::default()
            },
            webhooks: settings::WebhookSettings {
                stripe_webhook_secret: Some("whsec_one,whsec_two".into()),
                ..Default::default()
            },
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
                stripe: settings::StripeSettings {
                    stripe_budget_rps: Some(rps),
                    ..Default::default()
                },
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
                a.user_limits.user_portal_burst = Some(0)
            }),
            ("BILLSYNC_USER_EXPORT_BURST", |a| {
                a.user_limits.user_export_burst = Some(1_001)
            }),
            ("BILLSYNC_USER_EXPORT_INTERVAL_SECS", |a| {
                a.user_limits.user_export_interval_secs = Some(0)
            }),
            ("BILLSYNC_USER_DELETE_INTERVAL_SECS", |a| {
                a.user_limits.user_delete_interval_secs = Some(86_401)
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
            http: settings::HttpSettings {
                listen: Some("127.0.0.1:9001".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let config = Config::load(&args).unwrap();
        assert_eq!(config.listen.port(), 9001);
        assert_eq!(config.stripe.max_retries, 5);
        assert_eq!(config.stripe.api_base, "http://127.0.0.1:1");
    }

    #[test]
    fn the_file_sets_a_key_of_every_section() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billsync.toml");
        std::fs::write(
            &path,
            "database_url = \"postgres://db/x\"\n\
             body_read_timeout_secs = 7\n\
             stripe_budget_rps = 9\n\
             jwt_audience = \"app\"\n\
             app_url = \"https://app.example.com/\"\n\
             erasure_pepper = \"{pepper}\"\n\
             outbox_max_attempts = 3\n\
             event_retention_days = 2\n\
             user_export_burst = 4\n\
             run_workers = false\n"
                .replace("{pepper}", &"p".repeat(32)),
        )
        .unwrap();
        let config = Config::load(&ConfigArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.database_url.expose(), "postgres://db/x");
        assert_eq!(config.body_read_timeout, Duration::from_secs(7));
        assert_eq!(config.stripe.budget_rps, 9);
        assert_eq!(config.jwt.audience, "app");
        assert_eq!(config.app_url.as_deref(), Some("https://app.example.com"));
        assert!(config.erasure_pepper.is_some());
        assert_eq!(config.outbox.max_attempts, 3);
        assert_eq!(config.webhooks.retention, Duration::from_secs(2 * 86_400));
        assert_eq!(config.user_limits.export.burst, 4);
        assert!(!config.run_workers);
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
            database: settings::DatabaseSettings {
                database_url: Some("mysql://x".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"));
    }

    #[test]
    fn stripe_key_shape_is_checked_and_never_printed() {
        let config = Config::load(&ConfigArgs {
            stripe: settings::StripeSettings {
                stripe_secret_key: Some("pk_test_publishable".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        let err = config.stripe_secret_key().unwrap_err().to_string();
        assert!(err.contains("sk_"), "{err}");
        assert!(!err.contains("pk_test_publishable"));

        let config = Config::load(&ConfigArgs {
            stripe: settings::StripeSettings {
                stripe_secret_key: Some("sk_test_supersecret".into()),
                ..Default::default()
            },
            auth: settings::AuthSettings {
                admin_api_key: Some("admin-key-0123456789".into()),
                ..Default::default()
            },
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
