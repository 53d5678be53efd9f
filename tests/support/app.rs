//! A real billsync server on a loopback port (`TestApp`), its test configuration and
//! secrets, and what tests seed or sign for it: users linked in the store, Stripe signatures.

use std::{net::SocketAddr, sync::Arc};

use billsync::{
    app::Application,
    config::{settings, Config, ConfigArgs},
    http::AppState,
    store::Store,
};
use serde_json::Value;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789-abcdefghijklmnop";
pub const APP_URL: &str = "https://app.example.com";
pub const WEBHOOK_SECRET: &str = "whsec_test_secret";
pub const STRIPE_KEY: &str = "sk_test_billsync_0123456789";

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
            addr,
            state,
            // The server closes a keep-alive connection idle for its header timeout (10 s); a
            // client that kept it longer could send on it as it closes (IncompleteMessage).
            http: reqwest::Client::builder()
                .pool_idle_timeout(std::time::Duration::from_secs(5))
                .build()
                .expect("HTTP client"),
            _running: AbortOnDrop(running),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
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
