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
}
