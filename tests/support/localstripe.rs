//! localstripe, the shared one: its address (or a reported skip), and customers created in it
//! as another system would.

use serde_json::Value;

use super::{skip, STRIPE_KEY};

pub const LOCALSTRIPE_ENV: &str = "BILLSYNC_TEST_LOCALSTRIPE_URL";

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

/// Direct access to localstripe, as the Stripe dashboard or another system would change it.
pub struct LocalStripe {
    pub base: String,
    pub(super) http: reqwest::Client,
}

impl LocalStripe {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// A form POST to `path`; panics unless it is a 2xx.
    pub async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .basic_auth(STRIPE_KEY, Some(""))
            .form(form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("localstripe POST {path}: {e}"));
        assert!(
            response.status().is_success(),
            "localstripe POST {path}: {}",
            response.status()
        );
        response.json().await.expect("json")
    }

    /// A GET of `path`'s JSON, whatever its status.
    pub async fn get_json(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .basic_auth(STRIPE_KEY, Some(""))
            .send()
            .await
            .unwrap_or_else(|e| panic!("localstripe GET {path}: {e}"))
            .json()
            .await
            .expect("json")
    }

    pub async fn create_customer(&self, form: &[(&str, &str)]) -> Value {
        self.post_form("/v1/customers", form).await
    }

    pub async fn customer(&self, id: &str) -> Value {
        self.get_json(&format!("/v1/customers/{id}")).await
    }
}
