//! Shared test support: real stores (SQLite temp files; a fresh Postgres database per test when
//! `BILLSYNC_TEST_POSTGRES_URL` is set), a real billsync server on a loopback port, and
//! localstripe helpers (when `BILLSYNC_TEST_LOCALSTRIPE_URL` is set). Suites whose environment
//! is missing are skipped out loud, never silently.
#![allow(dead_code)]

use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
};

use billsync::{
    config::{Config, ConfigArgs},
    http::{app, AppState},
    store::{self, Store},
    stripe::StripeClient,
};
use serde_json::Value;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const STRIPE_KEY: &str = "sk_test_billsync_0123456789";
pub const POSTGRES_ENV: &str = "BILLSYNC_TEST_POSTGRES_URL";
pub const LOCALSTRIPE_ENV: &str = "BILLSYNC_TEST_LOCALSTRIPE_URL";

/// Says on the real stderr (not the captured test output) that a test did not run and why.
pub fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    /// A fresh, migrated store, or `None` (reported) when this backend is not configured.
    pub async fn store(self, test: &str) -> Option<TestStore> {
        match self {
            Self::Sqlite => Some(sqlite_store().await),
            Self::Postgres => postgres_store(test).await,
        }
    }
}

pub async fn sqlite_store() -> TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("billsync.db").display());
    let store = store::connect(&url, 8).await.expect("open sqlite");
    store.migrate().await.expect("migrate sqlite");
    TestStore {
        store,
        url,
        _dir: Some(dir),
    }
}

pub async fn postgres_store(test: &str) -> Option<TestStore> {
    let Ok(admin_url) = std::env::var(POSTGRES_ENV) else {
        skip(
            test,
            &format!(
                "{POSTGRES_ENV} is not set (e.g. postgres://postgres@127.0.0.1:5432/postgres)"
            ),
        );
        return None;
    };
    let name = format!("billsync_test_{}", uuid::Uuid::new_v4().simple());
    let admin = admin_pool(&admin_url).await;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    let url = database_url(&admin_url, &name);
    let store = store::connect(&url, 20).await.expect("open postgres");
    store.migrate().await.expect("migrate postgres");
    Some(TestStore {
        store,
        url,
        _dir: None,
    })
}

async fn admin_pool(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("connect to postgres")
}

/// `url` with its database name replaced.
pub fn database_url(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let (server, _) = base.rsplit_once('/').expect("postgres url has a path");
    match query {
        Some(q) => format!("{server}/{database}?{q}"),
        None => format!("{server}/{database}"),
    }
}

pub fn localstripe_url(test: &str) -> Option<String> {
    match std::env::var(LOCALSTRIPE_ENV) {
        Ok(url) => Some(url.trim_end_matches('/').to_owned()),
        Err(_) => {
            skip(
                test,
                &format!(
                    "{LOCALSTRIPE_ENV} is not set (start it with scripts/localstripe.sh start)"
                ),
            );
            None
        }
    }
}

/// Test configuration: short Stripe timeouts and retry delays, an admin key.
pub fn test_config(stripe_base: &str) -> Config {
    let mut config = Config::load(&ConfigArgs {
        stripe_secret_key: Some(STRIPE_KEY.into()),
        stripe_api_base: Some(stripe_base.into()),
        admin_api_key: Some(ADMIN_KEY.into()),
        stripe_timeout_ms: Some(2_000),
        stripe_max_retries: Some(2),
        ..Default::default()
    })
    .expect("test config");
    config.stripe.retry_base_delay = std::time::Duration::from_millis(10);
    config.stripe.retry_max_delay = std::time::Duration::from_millis(200);
    config
}

/// A billsync server on a real loopback port.
pub struct TestApp {
    pub base_url: String,
    pub addr: SocketAddr,
    pub state: AppState,
    pub http: reqwest::Client,
    _server: tokio::task::JoinHandle<()>,
}

impl TestApp {
    pub async fn spawn(store: Arc<dyn Store>, config: &Config) -> Self {
        let stripe = StripeClient::new(
            &config.stripe,
            config.stripe_secret_key().expect("test stripe key"),
        )
        .expect("stripe client");
        let state = AppState::new(config, store, stripe);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let router = app(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("server runs");
        });
        Self {
            base_url: format!("http://{addr}"),
            addr,
            state,
            http: reqwest::Client::new(),
            _server: server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// An admin request with the key.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(ADMIN_KEY)
    }

    pub async fn put_user(&self, user_id: &str, body: Value) -> Value {
        let response = self
            .admin(
                reqwest::Method::PUT,
                &format!("/v1/users/{}", encode(user_id)),
            )
            .json(&body)
            .send()
            .await
            .expect("PUT user");
        assert_eq!(response.status(), 200, "PUT user");
        response.json().await.expect("json")
    }

    /// `POST /v1/users/{id}/customer`; the status and the JSON body.
    pub async fn resolve(&self, user_id: &str) -> (u16, Value) {
        let response = self
            .admin(
                reqwest::Method::POST,
                &format!("/v1/users/{}/customer", encode(user_id)),
            )
            .send()
            .await
            .expect("POST customer");
        let status = response.status().as_u16();
        (status, response.json().await.expect("json"))
    }
}

/// Percent-encodes a path segment.
pub fn encode(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Direct access to localstripe, as the Stripe dashboard or another system would change it.
pub struct LocalStripe {
    pub base: String,
    http: reqwest::Client,
}

impl LocalStripe {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn create_customer(&self, form: &[(&str, &str)]) -> Value {
        let response = self
            .http
            .post(format!("{}/v1/customers", self.base))
            .basic_auth(STRIPE_KEY, Some(""))
            .form(form)
            .send()
            .await
            .expect("localstripe create");
        assert!(
            response.status().is_success(),
            "localstripe create: {}",
            response.status()
        );
        response.json().await.expect("json")
    }

    pub async fn customer(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/v1/customers/{id}", self.base))
            .basic_auth(STRIPE_KEY, Some(""))
            .send()
            .await
            .expect("localstripe retrieve")
            .json()
            .await
            .expect("json")
    }

    /// Every customer with exactly this email.
    pub async fn customers_with_email(&self, email: &str) -> Vec<Value> {
        let list: Value = self
            .http
            .get(format!("{}/v1/customers", self.base))
            .query(&[("email", email), ("limit", "1000")])
            .basic_auth(STRIPE_KEY, Some(""))
            .send()
            .await
            .expect("localstripe list")
            .json()
            .await
            .expect("json");
        list["data"].as_array().cloned().unwrap_or_default()
    }
}

/// Every log line of this test binary, captured once, for tests that assert what was logged.
/// Tests search it for their own unique ids, so concurrent tests do not interfere.
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("billsync=debug"))
            .with_ansi(false)
            .with_writer(move || CaptureWriter(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        buffer
    })
    .clone()
}

pub fn logs_text() -> String {
    String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned()
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Generates one test per backend from `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}
