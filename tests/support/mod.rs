//! Shared test support: real stores (SQLite temp files; a fresh Postgres database per test when
//! `BILLSYNC_TEST_POSTGRES_URL` is set), a real billsync server on a loopback port, and
//! localstripe helpers (when `BILLSYNC_TEST_LOCALSTRIPE_URL` is set). Suites whose environment
//! is missing are skipped out loud, never silently.
#![allow(dead_code)]

pub mod process;
pub mod stripe_standin;

use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
};

use billsync::{
    app::Application,
    config::{settings, Config, ConfigArgs},
    http::AppState,
    store::{self, Store},
};
use serde_json::Value;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789-abcdefghijklmnop";
pub const APP_URL: &str = "https://app.example.com";
pub const WEBHOOK_SECRET: &str = "whsec_test_secret";
pub const STRIPE_KEY: &str = "sk_test_billsync_0123456789";
pub const POSTGRES_ENV: &str = "BILLSYNC_TEST_POSTGRES_URL";
pub const LOCALSTRIPE_ENV: &str = "BILLSYNC_TEST_LOCALSTRIPE_URL";

/// Says on the real stderr (not the captured test output) that a test did not run and why.
/// With `BILLSYNC_REQUIRE_SUITES=1` (CI) a skip is a failure: the suite must run.
pub fn skip(test: &str, reason: &str) {
    if std::env::var("BILLSYNC_REQUIRE_SUITES").is_ok_and(|v| v == "1") {
        panic!("{test} cannot run: {reason} (BILLSYNC_REQUIRE_SUITES=1)");
    }
    // One write of the whole line, so scripts/test.sh can count it among the test output.
    let line = format!("SKIPPED {test}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
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
        let t = self.unmigrated_store(test).await?;
        t.store.migrate().await.expect("migrate");
        Some(t)
    }

    /// A fresh store whose database has no schema yet (for upgrade tests).
    pub async fn unmigrated_store(self, test: &str) -> Option<TestStore> {
        match self {
            Self::Sqlite => Some(unmigrated_sqlite_store().await),
            Self::Postgres => unmigrated_postgres_store(test).await,
        }
    }

    /// This backend's migration files (`migrations/<backend>`).
    pub fn migrations_dir(self) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(match self {
                Self::Sqlite => "sqlite",
                Self::Postgres => "postgres",
            })
    }
}

pub async fn sqlite_store() -> TestStore {
    let t = unmigrated_sqlite_store().await;
    t.store.migrate().await.expect("migrate sqlite");
    t
}

async fn unmigrated_sqlite_store() -> TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("billsync.db").display());
    let store = store::connect(&url, 8).await.expect("open sqlite");
    TestStore {
        store,
        url,
        _dir: Some(dir),
    }
}

pub async fn postgres_store(test: &str) -> Option<TestStore> {
    let t = unmigrated_postgres_store(test).await?;
    t.store.migrate().await.expect("migrate postgres");
    Some(t)
}

async fn unmigrated_postgres_store(test: &str) -> Option<TestStore> {
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

/// A localstripe of the test's own (for tests that must see every customer, such as
/// reconcile): started from the venv `scripts/localstripe.sh install` made, on a free port,
/// killed on drop. Runs when the shared one is configured (which means it is installed).
pub struct PrivateLocalStripe {
    pub base: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for PrivateLocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn private_localstripe(test: &str) -> Option<PrivateLocalStripe> {
    localstripe_url(test)?;
    let venv = std::env::var("BILLSYNC_LOCALSTRIPE_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/billsync/localstripe-venv",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    let child = std::process::Command::new(format!("{venv}/bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/localstripe_server.py"
        ))
        .arg(port.to_string())
        .arg(dir.path())
        .env("BILLSYNC_LOCALSTRIPE_PERSIST", "0")
        .env("TMPDIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start a private localstripe");
    let private = PrivateLocalStripe {
        base: format!("http://127.0.0.1:{port}"),
        child,
        _dir: dir,
    };
    let http = reqwest::Client::new();
    eventually(30, "private localstripe up", || async {
        http.get(format!("{}/v1/customers?limit=1", private.base))
            .basic_auth(STRIPE_KEY, Some(""))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    Some(private)
}

/// Test configuration: short Stripe timeouts and retry delays, an admin key.
pub fn test_config(stripe_base: &str) -> Config {
    let mut config = Config::load(&ConfigArgs {
        stripe: settings::StripeSettings {
            stripe_secret_key: Some(STRIPE_KEY.into()),
            stripe_api_base: Some(stripe_base.into()),
            stripe_timeout_ms: Some(2_000),
            stripe_max_retries: Some(2),
            // Fakes and localstripe have no rate limit to protect, and the flows under test make
            // many calls and requests at once: the limits' own tests set small ones.
            stripe_budget_rps: Some(1_000),
            ..Default::default()
        },
        auth: settings::AuthSettings {
            admin_api_key: Some(ADMIN_KEY.into()),
            jwt_secret: Some(JWT_SECRET.into()),
            ..Default::default()
        },
        portal: settings::PortalSettings {
            app_url: Some(APP_URL.into()),
            ..Default::default()
        },
        outbox: settings::OutboxSettings {
            outbox_poll_ms: Some(20),
            outbox_debounce_ms: Some(150),
            outbox_backoff_base_ms: Some(50),
            ..Default::default()
        },
        webhooks: settings::WebhookSettings {
            stripe_webhook_secret: Some(WEBHOOK_SECRET.into()),
            ..Default::default()
        },
        // Many requests of one user at once, for the same reason.
        user_limits: settings::UserLimitSettings {
            user_portal_burst: Some(1_000),
            user_export_burst: Some(1_000),
            user_delete_burst: Some(1_000),
            ..Default::default()
        },
        ..Default::default()
    })
    .expect("test config");
    config.stripe.retry_base_delay = std::time::Duration::from_millis(10);
    config.stripe.retry_max_delay = std::time::Duration::from_millis(200);
    config.outbox.backoff_max = std::time::Duration::from_millis(400);
    config.jwt.jwks_min_refresh = std::time::Duration::ZERO;
    config
}

/// A billsync server on a real loopback port, built and run by the production composition
/// root (with its outbox worker and event applier); stopped when dropped.
pub struct TestApp {
    pub base_url: String,
    pub addr: SocketAddr,
    pub state: AppState,
    pub http: reqwest::Client,
    _running: AbortOnDrop,
}

pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TestApp {
    pub async fn spawn(store: Arc<dyn Store>, config: &Config) -> Self {
        let mut config = config.clone();
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let application = Application::build_with_store(&config, store)
            .await
            .expect("build the application");
        let addr = application.local_addr().expect("local addr");
        let state = application.state().clone();
        // A shutdown that never comes: the test ends by dropping the app.
        let running = tokio::spawn(async move {
            application
                .run_until_stopped(std::future::pending())
                .await
                .expect("server runs");
        });
        Self {
            base_url: format!("http://{addr}"),
            addr,
            state,
            http: reqwest::Client::new(),
            _running: AbortOnDrop(running),
        }
    }

    /// A request as a signed-in user.
    pub fn as_user(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
    ) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(token)
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

    /// An admin `GET`'s text body (`/metrics`), whatever its status.
    pub async fn admin_text(&self, path: &str) -> String {
        self.admin(reqwest::Method::GET, path)
            .send()
            .await
            .expect("admin GET")
            .text()
            .await
            .expect("text")
    }

    /// An unauthenticated `GET`'s JSON body (`/openapi.json`), whatever its status.
    pub async fn public_json(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("json")
    }

    /// An admin `GET`'s JSON body, whatever its status.
    pub async fn admin_json(&self, path: &str) -> Value {
        self.admin(reqwest::Method::GET, path)
            .send()
            .await
            .expect("admin GET")
            .json()
            .await
            .expect("json")
    }

    /// POSTs a Stripe event body, signed with the test secret, to the webhook route; 200.
    pub async fn deliver_webhook(&self, body: &str) {
        let response = self
            .http
            .post(self.url("/api/webhooks/stripe"))
            .header("stripe-signature", stripe_signature(WEBHOOK_SECRET, body))
            .body(body.to_owned())
            .send()
            .await
            .expect("POST webhook");
        assert_eq!(response.status(), 200, "webhook delivery");
    }

    /// Waits until no stored event is pending or failed.
    pub async fn events_settled(&self) {
        eventually(15, "every event applied", || async {
            let pending = self.admin_json("/v1/events?state=pending&limit=1000").await;
            let failed = self.admin_json("/v1/events?state=failed&limit=1000").await;
            (pending["events"].as_array().is_some_and(Vec::is_empty)
                && failed["events"].as_array().is_some_and(Vec::is_empty))
            .then_some(())
        })
        .await;
    }

    /// `POST /v1/reconcile` (202); the run's id.
    pub async fn start_reconcile(&self) -> String {
        let started = self
            .admin(reqwest::Method::POST, "/v1/reconcile")
            .send()
            .await
            .expect("POST reconcile");
        assert_eq!(started.status(), 202, "reconcile started");
        let run: Value = started.json().await.expect("json");
        run["run"]["id"].as_str().expect("run id").to_owned()
    }

    /// Waits for a reconcile run to end; `GET /v1/reconcile/{id}`'s body.
    pub async fn reconcile_finished(&self, id: &str) -> Value {
        eventually(30, "the reconcile run finished", || async {
            let run: Value = self.admin_json(&format!("/v1/reconcile/{id}")).await;
            (run["run"]["status"] != "running").then_some(run)
        })
        .await
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

    /// Changes the customer as the billing portal or the dashboard would (no billsync
    /// metadata touched); returns it as it then is.
    pub async fn update_customer(&self, id: &str, form: &[(&str, &str)]) -> Value {
        let response = self
            .http
            .post(format!("{}/v1/customers/{id}", self.base))
            .basic_auth(STRIPE_KEY, Some(""))
            .form(form)
            .send()
            .await
            .expect("localstripe update");
        assert!(response.status().is_success(), "update {id}");
        response.json().await.expect("json")
    }

    /// A customer with a card on file, so subscriptions to `plan` start active.
    pub async fn subscribe(&self, customer: &str, plan: &str) -> Value {
        let auth = (STRIPE_KEY, Some(""));
        let _ = self
            .http
            .post(format!("{}/v1/plans", self.base))
            .basic_auth(auth.0, auth.1)
            .form(&[
                ("id", plan),
                ("amount", "1000"),
                ("currency", "usd"),
                ("interval", "month"),
                ("product[name]", "Pro"),
            ])
            .send()
            .await
            .expect("plan");
        let token: Value = self
            .http
            .post(format!("{}/v1/tokens", self.base))
            .basic_auth(auth.0, auth.1)
            .form(&[
                ("card[number]", "4242424242424242"),
                ("card[exp_month]", "12"),
                ("card[exp_year]", "2030"),
                ("card[cvc]", "123"),
            ])
            .send()
            .await
            .expect("token")
            .json()
            .await
            .expect("json");
        let attached = self
            .http
            .post(format!("{}/v1/customers/{customer}/sources", self.base))
            .basic_auth(auth.0, auth.1)
            .form(&[("source", token["id"].as_str().unwrap())])
            .send()
            .await
            .expect("attach source");
        assert!(
            attached.status().is_success(),
            "attach source: {}",
            attached.status()
        );
        let response = self
            .http
            .post(format!("{}/v1/subscriptions", self.base))
            .basic_auth(auth.0, auth.1)
            .form(&[("customer", customer), ("items[0][plan]", plan)])
            .send()
            .await
            .expect("subscription");
        assert!(
            response.status().is_success(),
            "subscription: {}",
            response.status()
        );
        response.json().await.expect("json")
    }

    pub async fn subscription(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/v1/subscriptions/{id}", self.base))
            .basic_auth(STRIPE_KEY, Some(""))
            .send()
            .await
            .expect("localstripe retrieve subscription")
            .json()
            .await
            .expect("json")
    }

    /// Deletes the customer, as the dashboard would.
    pub async fn delete_customer(&self, id: &str) {
        let response = self
            .http
            .delete(format!("{}/v1/customers/{id}", self.base))
            .basic_auth(STRIPE_KEY, Some(""))
            .send()
            .await
            .expect("localstripe delete");
        assert!(response.status().is_success(), "delete {id}");
    }

    /// Status and body of a customer retrieve (404 once deleted).
    pub async fn customer_status(&self, id: &str) -> u16 {
        self.http
            .get(format!("{}/v1/customers/{id}", self.base))
            .basic_auth(STRIPE_KEY, Some(""))
            .send()
            .await
            .expect("localstripe retrieve")
            .status()
            .as_u16()
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

/// Creates `user` (verified `<user>@example.com`, no name) and links it to `customer`,
/// directly in the store.
pub async fn seed_linked_user(store: &dyn Store, user: &str, customer: &str) {
    store
        .upsert_user(&billsync::store::UserUpsert {
            id: billsync::domain::UserId::parse(user).unwrap(),
            email: billsync::domain::Email::parse(&format!("{user}@example.com")).unwrap(),
            email_verified: true,
            first_name: None,
            last_name: None,
            phone: None,
        })
        .await
        .unwrap();
    link_in_store(store, user, customer).await;
}

/// Links `user` (who must exist) to `customer` directly in the store, as a resolve would.
pub async fn link_in_store(store: &dyn Store, user: &str, customer: &str) {
    store
        .insert_link(
            &billsync::domain::UserId::parse(user).unwrap(),
            &billsync::domain::StripeCustomerId::parse(customer).unwrap(),
            false,
            billsync::domain::LinkSource::Created,
        )
        .await
        .unwrap();
}

/// A link's watermark, read as the applier reads it: with the customer's update context.
pub async fn link_watermark(store: &dyn Store, customer: &str) -> Option<(i64, Option<String>)> {
    let mut contexts = store.update_contexts(&[customer.to_owned()]).await.unwrap();
    contexts.pop().and_then(|c| c.watermark)
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

/// An HS256 user token as Supabase issues them, valid for an hour.
pub fn user_token(sub: &str, email: Option<&str>, verified: Option<Value>) -> String {
    let mut claims = serde_json::json!({
        "sub": sub,
        "aud": "authenticated",
        "role": "authenticated",
        "exp": time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
        "iat": time::OffsetDateTime::now_utc().unix_timestamp(),
    });
    if let Some(email) = email {
        claims["email"] = email.into();
    }
    if let Some(verified) = verified {
        claims["email_verified"] = verified;
    }
    sign_hs256(&claims)
}

pub fn sign_hs256(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign token")
}

/// A TCP forwarder to a real server that can be cut: while down it refuses nothing but
/// closes every connection at once, the way an unreachable Stripe looks to a client.
pub struct CuttableProxy {
    pub url: String,
    up: Arc<std::sync::atomic::AtomicBool>,
    _task: AbortOnDrop,
}

impl CuttableProxy {
    pub async fn start(target: &str) -> Self {
        let target = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = up.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    // Cut live connections too when the proxy goes down.
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    tokio::pin!(copy);
                    loop {
                        tokio::select! {
                            _ = &mut copy => return,
                            _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                                if !flag.load(std::sync::atomic::Ordering::SeqCst) { return; }
                            }
                        }
                    }
                });
            }
        });
        Self {
            url,
            up,
            _task: AbortOnDrop(task),
        }
    }

    /// Cuts or restores the link; returns once live connections have seen it.
    pub async fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    }
}

/// Polls `check` until it returns `Some`, or panics after `seconds`.
pub async fn eventually<T, F, Fut>(seconds: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// A `Stripe-Signature` header for `body`, signed now with `secret`.
pub fn stripe_signature(secret: &str, body: &str) -> String {
    let t = time::OffsetDateTime::now_utc().unix_timestamp();
    format!(
        "t={t},v1={}",
        hex::encode(billsync::webhooks::signature::sign(
            secret,
            t,
            body.as_bytes()
        ))
    )
}
