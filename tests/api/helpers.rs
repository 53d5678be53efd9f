//! The API suite's own helpers (included in its `support` module): admin reads, webhook
//! deliveries and reconcile runs on a `TestApp`, the rest of localstripe's dashboard, a private
//! localstripe, and link watermarks.

use billsync::store::Store;
use serde_json::Value;

use super::{
    eventually, localstripe_url, stripe_signature, unique, LocalStripe, TestApp, STRIPE_KEY,
    WEBHOOK_SECRET,
};

/// Sends the request: the answer's status and its JSON body.
pub async fn status_and_json(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

impl TestApp {
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
        let status = response.status();
        let answer = response.text().await.unwrap_or_default();
        assert_eq!(status, 200, "webhook delivery: {answer}");
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
}

impl LocalStripe {
    /// Changes the customer as the billing portal or the dashboard would (no billsync
    /// metadata touched); returns it as it then is.
    pub async fn update_customer(&self, id: &str, form: &[(&str, &str)]) -> Value {
        self.post_form(&format!("/v1/customers/{id}"), form).await
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
        self.get_json(&format!("/v1/subscriptions/{id}")).await
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

/// A link's watermark, read as the applier reads it: with the customer's update context.
pub async fn link_watermark(store: &dyn Store, customer: &str) -> Option<(i64, Option<String>)> {
    let mut contexts = store.update_contexts(&[customer.to_owned()]).await.unwrap();
    contexts.pop().and_then(|c| c.watermark)
}

/// The app's endpoint registered with localstripe, which then sends it signed events; `mute`
/// stops that.
pub struct Registration {
    base: String,
    name: String,
}

impl Registration {
    pub async fn new(base: &str, app: &TestApp) -> Self {
        let name = unique("hook");
        let response = reqwest::Client::new()
            .post(format!("{base}/_config/webhooks/{name}"))
            .form(&[
                ("url", app.url("/api/webhooks/stripe").as_str()),
                ("secret", WEBHOOK_SECRET),
            ])
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "register webhook: {}",
            response.status()
        );
        Self {
            base: base.to_owned(),
            name,
        }
    }

    pub async fn mute(self) {
        // localstripe cannot unregister: subscribe it to nothing.
        let _ = reqwest::Client::new()
            .post(format!("{}/_config/webhooks/{}", self.base, self.name))
            .form(&[
                ("url", "http://127.0.0.1:9/"),
                ("secret", "whsec_muted"),
                ("events[]", "none.none"),
            ])
            .send()
            .await;
    }
}
