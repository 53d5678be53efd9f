//! billsync's Stripe client: one send path (base URL from config, pinned `Stripe-Version`,
//! timeouts, retries with backoff, one idempotency key per logical POST, typed errors), and
//! the process's request budget every attempt passes through.

mod budget;
mod error;
pub mod form;
mod types;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use reqwest::{header::HeaderMap, Method, StatusCode};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

pub use budget::{current_priority, with_priority, Priority};
pub use error::{ApiError, StripeError};
pub use types::{
    Customer, Deleted, IdOnly, List, PortalConfiguration, PortalSession, Price, Subscription,
    SubscriptionItem, WebhookEndpoint,
};

/// Lookup keys Stripe takes in one price list.
pub const MAX_LOOKUP_KEYS: usize = 10;

use crate::config::{Secret, StripeConfig};

/// The metadata key naming the billsync user a customer belongs to.
pub const METADATA_USER_ID: &str = "userId";
/// The metadata key each profile push stamps with the user's profile version, so a
/// `customer.updated` tells which push (if any) its values came from.
pub const METADATA_PROFILE_VERSION: &str = "billsync_profile_version";
/// Stripe's largest page.
pub const MAX_PAGE: u32 = 100;
/// A user's customers listed by email stop here; more than this is a data problem to report,
/// not to page through on a request path.
const MAX_EMAIL_MATCHES: usize = 1_000;

pub type StripeResult<T> = Result<T, StripeError>;

/// Fields of a customer create or update. `Some("")` clears a field on update.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CustomerParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// The lists of a customer's objects the export passes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CustomerList {
    Subscriptions,
    Invoices,
    PaymentMethods,
}

/// Every subscription of the customer, whatever its status.
fn subscriptions_of(customer: &str) -> Vec<(&'static str, String)> {
    vec![
        ("customer", customer.to_owned()),
        ("status", "all".to_owned()),
    ]
}

/// One request, described before it is sent (and re-sent).
struct Request<'a> {
    /// A stable name for logs and metrics (`customers.create`, …).
    operation: &'static str,
    method: Method,
    path: String,
    query: Vec<(&'a str, String)>,
    form: Option<String>,
    idempotency_key: Option<String>,
}

#[derive(Clone)]
pub struct StripeClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: StripeConfig,
    secret_key: Secret,
    attempts_sent: AtomicU64,
    /// Shared by every clone, so by all of the process's Stripe work.
    budget: budget::Budget,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl StripeClient {
    pub fn new(config: &StripeConfig, secret_key: Secret) -> Result<Self, StripeError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("billsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StripeError::Transport {
                timed_out: false,
                message: format!("cannot build HTTP client: {e}"),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                config: config.clone(),
                secret_key,
                attempts_sent: AtomicU64::new(0),
                budget: budget::Budget::per_second(config.budget_rps),
            }),
        })
    }

    /// HTTP attempts sent since start (retries included).
    pub fn attempts_sent(&self) -> u64 {
        self.inner.attempts_sent.load(Ordering::Relaxed)
    }

    /// Calls waiting for a permit of the request budget now.
    pub fn waiting_for_budget(&self) -> usize {
        self.inner.budget.waiting()
    }

    pub async fn create_customer(
        &self,
        params: &CustomerParams,
        idempotency_key: &str,
    ) -> StripeResult<Customer> {
        self.send(Request {
            operation: "customers.create",
            method: Method::POST,
            path: "/v1/customers".into(),
            query: vec![],
            form: Some(encode_params(params)),
            idempotency_key: Some(idempotency_key.to_owned()),
        })
        .await
    }

    pub async fn retrieve_customer(&self, id: &str) -> StripeResult<Customer> {
        self.send(Request {
            operation: "customers.retrieve",
            method: Method::GET,
            path: format!("/v1/customers/{}", path_segment(id)),
            query: vec![],
            form: None,
            idempotency_key: None,
        })
        .await
    }

    pub async fn update_customer(
        &self,
        id: &str,
        params: &CustomerParams,
        idempotency_key: Option<&str>,
    ) -> StripeResult<Customer> {
        self.send(Request {
            operation: "customers.update",
            method: Method::POST,
            path: format!("/v1/customers/{}", path_segment(id)),
            query: vec![],
            form: Some(encode_params(params)),
            idempotency_key: idempotency_key.map(str::to_owned),
        })
        .await
    }

    /// Empties a kept customer of everything personal billsync knows Stripe may hold (email,
    /// name, phone, description, address, shipping: an empty value unsets a field) and sets
    /// `metadata` (billsync's keys emptied, its tombstone).
    pub async fn scrub_customer(
        &self,
        id: &str,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> StripeResult<Customer> {
        let params = serde_json::json!({
            "email": null, "name": null, "phone": null, "description": null,
            "address": null, "shipping": null, "metadata": metadata,
        });
        self.send(Request {
            operation: "customers.update",
            method: Method::POST,
            path: format!("/v1/customers/{}", path_segment(id)),
            query: vec![],
            form: Some(encode_params(&params)),
            idempotency_key: None,
        })
        .await
    }

    pub async fn delete_customer(&self, id: &str) -> StripeResult<Deleted> {
        self.send(Request {
            operation: "customers.delete",
            method: Method::DELETE,
            path: format!("/v1/customers/{}", path_segment(id)),
            query: vec![],
            form: None,
            idempotency_key: None,
        })
        .await
    }

    /// One page of customers, optionally filtered by exact email (Stripe compares it
    /// case-sensitively; billsync always sends its normalised, lowercase form).
    pub async fn list_customers(
        &self,
        email: Option<&str>,
        limit: u32,
        starting_after: Option<&str>,
    ) -> StripeResult<List<Customer>> {
        let filters = email.map(|e| ("email", e.to_owned())).into_iter().collect();
        self.list_page(
            "customers.list",
            "/v1/customers",
            filters,
            limit,
            starting_after,
        )
        .await
    }

    /// Every live customer with exactly this email, oldest first.
    pub async fn customers_by_email(&self, email: &str) -> StripeResult<Vec<Customer>> {
        let mut found: Vec<Customer> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .list_customers(Some(email), MAX_PAGE, cursor.as_deref())
                .await?;
            let more = page.has_more && !page.data.is_empty();
            // The cursor is the page's own last item, filtered or not.
            cursor = page.data.last().map(|c| c.id.clone());
            found.extend(page.data.into_iter().filter(|c| !c.deleted));
            if !more || found.len() >= MAX_EMAIL_MATCHES {
                if more {
                    tracing::warn!(matches = found.len(), "stopped listing customers by email");
                }
                break;
            }
        }
        found.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        Ok(found)
    }

    /// Customers matching a Search API query (`metadata["userId"]:"…"`, `email:"…"`), up to
    /// `MAX_EMAIL_MATCHES`; `None` where this Stripe has no search (localstripe, a
    /// restricted key, an account without search): a 404 or a 400 answers "no search here",
    /// logged once, never an error. Search is eventually consistent (about a minute behind):
    /// a finding, never a guarantee that nothing exists.
    pub async fn search_customers(&self, query: &str) -> StripeResult<Option<Vec<Customer>>> {
        #[derive(Deserialize)]
        struct SearchPage {
            #[serde(default)]
            data: Vec<Customer>,
            #[serde(default)]
            has_more: bool,
            #[serde(default)]
            next_page: Option<String>,
        }
        static NO_SEARCH_LOGGED: std::sync::atomic::AtomicBool =
            std::sync::atomic::AtomicBool::new(false);
        let mut found = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut params = vec![("query", query.to_owned()), ("limit", MAX_PAGE.to_string())];
            if let Some(cursor) = &page {
                params.push(("page", cursor.clone()));
            }
            let answer: StripeResult<SearchPage> = self
                .send(Request {
                    operation: "customers.search",
                    method: Method::GET,
                    path: "/v1/customers/search".into(),
                    query: params,
                    form: None,
                    idempotency_key: None,
                })
                .await;
            let result = match answer {
                Ok(result) => result,
                Err(StripeError::Api(e)) if e.status == 404 || e.status == 400 => {
                    if !NO_SEARCH_LOGGED.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            status = e.status,
                            "Stripe customer search unavailable here; resolving by listing only"
                        );
                    }
                    return Ok(None);
                }
                Err(other) => return Err(other),
            };
            found.extend(result.data.into_iter().filter(|c| !c.deleted));
            match result.next_page {
                Some(next) if result.has_more && found.len() < MAX_EMAIL_MATCHES => {
                    page = Some(next)
                }
                _ => break,
            }
        }
        found.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        Ok(Some(found))
    }

    /// Every subscription of a customer, whatever its status.
    pub async fn list_subscriptions(&self, customer: &str) -> StripeResult<Vec<Subscription>> {
        self.list_all(
            "subscriptions.list",
            "/v1/subscriptions",
            subscriptions_of(customer),
            |s: &Subscription| s.id.clone(),
        )
        .await
    }

    /// One page of the account's subscriptions, whatever their status (a reconciliation).
    pub async fn list_subscriptions_page(
        &self,
        limit: u32,
        starting_after: Option<&str>,
    ) -> StripeResult<List<Subscription>> {
        let filters = vec![("status", "all".to_owned())];
        self.list_page(
            "subscriptions.list",
            "/v1/subscriptions",
            filters,
            limit,
            starting_after,
        )
        .await
    }

    /// The customer exactly as Stripe returns it, every field (the GDPR export).
    pub async fn customer_as_stripe_has_it(&self, id: &str) -> StripeResult<Value> {
        self.send(Request {
            operation: "customers.retrieve",
            method: Method::GET,
            path: format!("/v1/customers/{}", path_segment(id)),
            query: vec![],
            form: None,
            idempotency_key: None,
        })
        .await
    }

    /// Every object of one of the customer's lists (`subscriptions`, `invoices`,
    /// `payment_methods`) exactly as Stripe returns them, paged through (the GDPR export).
    pub async fn customer_objects(
        &self,
        customer: &str,
        list: CustomerList,
    ) -> StripeResult<Vec<Value>> {
        let (operation, path, filters) = match list {
            CustomerList::Subscriptions => (
                "subscriptions.list",
                "/v1/subscriptions".to_owned(),
                subscriptions_of(customer),
            ),
            CustomerList::Invoices => (
                "invoices.list",
                "/v1/invoices".to_owned(),
                vec![("customer", customer.to_owned())],
            ),
            CustomerList::PaymentMethods => (
                "customers.payment_methods.list",
                format!("/v1/customers/{}/payment_methods", path_segment(customer)),
                vec![],
            ),
        };
        self.list_all(operation, &path, filters, |v: &Value| {
            v["id"].as_str().unwrap_or_default().to_owned()
        })
        .await
    }

    /// One page of a list endpoint: `filters`, then at most `limit` items (1 to 100) after
    /// the item `starting_after`.
    async fn list_page<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
        mut query: Vec<(&'static str, String)>,
        limit: u32,
        starting_after: Option<&str>,
    ) -> StripeResult<List<T>> {
        query.push(("limit", limit.clamp(1, MAX_PAGE).to_string()));
        if let Some(cursor) = starting_after {
            query.push(("starting_after", cursor.to_owned()));
        }
        self.send(Request {
            operation,
            method: Method::GET,
            path: path.to_owned(),
            query,
            form: None,
            idempotency_key: None,
        })
        .await
    }

    /// Every item of a list endpoint, 100 a page, each page after the last item's id.
    async fn list_all<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
        filters: Vec<(&'static str, String)>,
        id_of: impl Fn(&T) -> String,
    ) -> StripeResult<Vec<T>> {
        let mut found: Vec<T> = Vec::new();
        loop {
            let cursor = found.last().map(&id_of);
            let page: List<T> = self
                .list_page(
                    operation,
                    path,
                    filters.clone(),
                    MAX_PAGE,
                    cursor.as_deref(),
                )
                .await?;
            let more = page.has_more && !page.data.is_empty();
            found.extend(page.data);
            if !more {
                return Ok(found);
            }
        }
    }

    pub async fn retrieve_price(&self, id: &str) -> StripeResult<Price> {
        self.send(Request {
            operation: "prices.retrieve",
            method: Method::GET,
            path: format!("/v1/prices/{}", path_segment(id)),
            query: vec![],
            form: None,
            idempotency_key: None,
        })
        .await
    }

    /// The prices, active or not, with these lookup keys (at most [`MAX_LOOKUP_KEYS`]).
    pub async fn prices_by_lookup_keys(&self, keys: &[String]) -> StripeResult<Vec<Price>> {
        let mut query = vec![("limit".to_owned(), MAX_PAGE.to_string())];
        query.extend(
            keys.iter()
                .take(MAX_LOOKUP_KEYS)
                .enumerate()
                .map(|(i, key)| (format!("lookup_keys[{i}]"), key.clone())),
        );
        let page: List<Price> = self
            .send(Request {
                operation: "prices.list",
                method: Method::GET,
                path: "/v1/prices".into(),
                query: query.iter().map(|(k, v)| (k.as_str(), v.clone())).collect(),
                form: None,
                idempotency_key: None,
            })
            .await?;
        Ok(page.data)
    }

    pub async fn retrieve_subscription(&self, id: &str) -> StripeResult<Subscription> {
        self.send(Request {
            operation: "subscriptions.retrieve",
            method: Method::GET,
            path: format!("/v1/subscriptions/{}", path_segment(id)),
            query: vec![],
            form: None,
            idempotency_key: None,
        })
        .await
    }

    pub async fn cancel_subscription(&self, id: &str) -> StripeResult<Subscription> {
        self.send(Request {
            operation: "subscriptions.cancel",
            method: Method::DELETE,
            path: format!("/v1/subscriptions/{}", path_segment(id)),
            query: vec![],
            form: None,
            idempotency_key: None,
        })
        .await
    }

    /// `params` as Stripe documents them (`customer`, `return_url`, `configuration`, `flow_data`).
    pub async fn create_portal_session(&self, params: &Value) -> StripeResult<PortalSession> {
        self.send(Request {
            operation: "billing_portal.sessions.create",
            method: Method::POST,
            path: "/v1/billing_portal/sessions".into(),
            query: vec![],
            form: Some(form::encode(&form::form_pairs(params))),
            idempotency_key: None,
        })
        .await
    }

    pub async fn create_portal_configuration(
        &self,
        params: &Value,
        idempotency_key: &str,
    ) -> StripeResult<PortalConfiguration> {
        self.send(Request {
            operation: "billing_portal.configurations.create",
            method: Method::POST,
            path: "/v1/billing_portal/configurations".into(),
            query: vec![],
            form: Some(form::encode(&form::form_pairs(params))),
            idempotency_key: Some(idempotency_key.to_owned()),
        })
        .await
    }

    /// The configuration as Stripe holds it, whole.
    pub async fn retrieve_portal_configuration(&self, id: &str) -> StripeResult<Value> {
        self.send(Request {
            operation: "billing_portal.configurations.retrieve",
            method: Method::GET,
            path: format!("/v1/billing_portal/configurations/{}", path_segment(id)),
            query: vec![],
            form: None,
            idempotency_key: None,
        })
        .await
    }

    pub async fn update_portal_configuration(
        &self,
        id: &str,
        params: &Value,
    ) -> StripeResult<PortalConfiguration> {
        self.send(Request {
            operation: "billing_portal.configurations.update",
            method: Method::POST,
            path: format!("/v1/billing_portal/configurations/{}", path_segment(id)),
            query: vec![],
            form: Some(form::encode(&form::form_pairs(params))),
            idempotency_key: None,
        })
        .await
    }

    /// Every webhook endpoint of the account.
    pub async fn list_webhook_endpoints(&self) -> StripeResult<Vec<WebhookEndpoint>> {
        self.list_all(
            "webhook_endpoints.list",
            "/v1/webhook_endpoints",
            vec![],
            |e: &WebhookEndpoint| e.id.clone(),
        )
        .await
    }

    /// Creates an endpoint sending `events` to `url`, generated with `api_version`. The answer
    /// is the only one that carries the endpoint's signing secret.
    pub async fn create_webhook_endpoint(
        &self,
        url: &str,
        events: &[&str],
        api_version: &str,
        description: &str,
    ) -> StripeResult<WebhookEndpoint> {
        let params = serde_json::json!({
            "url": url,
            "enabled_events": events,
            "api_version": api_version,
            "description": description,
        });
        self.send(Request {
            operation: "webhook_endpoints.create",
            method: Method::POST,
            path: "/v1/webhook_endpoints".into(),
            query: vec![],
            form: Some(form::encode(&form::form_pairs(&params))),
            idempotency_key: None,
        })
        .await
    }

    /// Makes the endpoint send exactly `events`, and enables it. (Its API version cannot be
    /// changed: Stripe takes it at creation only.)
    pub async fn update_webhook_endpoint(
        &self,
        id: &str,
        events: &[&str],
    ) -> StripeResult<WebhookEndpoint> {
        let params = serde_json::json!({"enabled_events": events, "disabled": false});
        self.send(Request {
            operation: "webhook_endpoints.update",
            method: Method::POST,
            path: format!("/v1/webhook_endpoints/{}", path_segment(id)),
            query: vec![],
            form: Some(form::encode(&form::form_pairs(&params))),
            idempotency_key: None,
        })
        .await
    }

    /// The one send path. A POST gets one idempotency key for all its attempts, so a retry
    /// after a lost answer cannot act twice. Every attempt first takes a permit of the budget,
    /// in the class of the task that calls (see [`Priority`]).
    async fn send<T: DeserializeOwned>(&self, request: Request<'_>) -> StripeResult<T> {
        let config = &self.inner.config;
        let idempotency_key = match (&request.method, request.idempotency_key) {
            (&Method::POST, None) => Some(uuid::Uuid::new_v4().to_string()),
            (_, key) => key,
        };
        let url = format!("{}{}", config.api_base, request.path);
        let priority = current_priority();
        // The attempts of one call wait for permits one attempt timeout at most, together: a
        // person gets a clear 503 rather than a hang, and a job's call still fits its lease
        // (sized for its attempts and their delays, plus this). Only the waiting counts, not
        // the attempts: a retry after an attempt that timed out must still be sent, with the
        // same idempotency key, or the job's next claim would send the change again under a
        // new one.
        let mut budget_left = config.timeout;
        let mut attempt: u32 = 0;
        loop {
            if let Ok(waited) = self.inner.budget.acquire(priority, budget_left).await {
                budget_left = budget_left.saturating_sub(waited);
            } else {
                metrics::counter!("billsync_stripe_budget_exhausted_total",
                    "priority" => priority.label())
                .increment(1);
                tracing::warn!(
                    operation = request.operation,
                    priority = priority.label(),
                    attempt,
                    "no Stripe request budget within the timeout; not sent"
                );
                return Err(StripeError::BudgetExhausted);
            }
            let started = Instant::now();
            let mut builder = self
                .inner
                .http
                .request(request.method.clone(), &url)
                .bearer_auth(self.inner.secret_key.expose())
                .header("Stripe-Version", &config.api_version);
            if !request.query.is_empty() {
                builder = builder.query(&request.query);
            }
            if let Some(key) = &idempotency_key {
                builder = builder.header("Idempotency-Key", key);
            }
            if let Some(body) = &request.form {
                builder = builder
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body.clone());
            }
            self.inner.attempts_sent.fetch_add(1, Ordering::Relaxed);
            let outcome = match builder.send().await {
                Ok(response) => read_response::<T>(response).await,
                Err(err) => Err(Failure::transport(&err)),
            };
            let elapsed = started.elapsed();
            let elapsed_ms = elapsed.as_millis() as u64;
            crate::telemetry::stripe_attempt(
                request.operation,
                match &outcome {
                    Ok(_) => "ok",
                    Err(failure) => failure.error.metric_outcome(),
                },
                elapsed.as_secs_f64(),
            );
            let failure = match outcome {
                Ok(value) => {
                    tracing::debug!(
                        operation = request.operation,
                        attempt,
                        elapsed_ms,
                        "stripe call ok"
                    );
                    return Ok(value);
                }
                Err(failure) => failure,
            };
            // A server asking for a longer wait than we allow gets its answer passed on, with
            // its Retry-After, rather than a retry sooner than it asked.
            let wait_too_long = failure
                .retry_after
                .is_some_and(|w| w > config.retry_max_delay);
            if !failure.retryable || attempt >= config.max_retries || wait_too_long {
                tracing::warn!(
                    operation = request.operation,
                    attempt,
                    elapsed_ms,
                    error = %failure.error,
                    "stripe call failed"
                );
                return Err(failure.error);
            }
            let delay = retry_delay(config, attempt, failure.retry_after);
            tracing::info!(
                operation = request.operation,
                attempt,
                elapsed_ms,
                delay_ms = delay.as_millis() as u64,
                error = %failure.error,
                "stripe call failed; retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

fn encode_params<P: Serialize>(params: &P) -> String {
    let value = serde_json::to_value(params).expect("parameter structs serialize to JSON");
    form::encode(&form::form_pairs(&value))
}

/// Ids come from Stripe or our database, but they go into a URL path: anything but Stripe's
/// id alphabet (including `.` and `..`, which URL normalisation would resolve) is encoded
/// character by character, so it can never add a segment, a query or a step up.
fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

struct Failure {
    error: StripeError,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn transport(err: &reqwest::Error) -> Self {
        // Retrying after a timeout is safe: GETs and DELETEs are idempotent, POSTs carry a key.
        Self {
            error: StripeError::Transport {
                timed_out: err.is_timeout(),
                message: without_url(err),
            },
            retryable: true,
            retry_after: None,
        }
    }
}

fn without_url(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    if let Some(url) = err.url() {
        text = text.replace(url.as_str(), "<stripe>");
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn read_response<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, Failure> {
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(|e| Failure::transport(&e))?;
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|e| Failure {
            error: StripeError::Decode(e.to_string()),
            retryable: false,
            retry_after: None,
        });
    }
    let parsed = serde_json::from_slice::<ErrorEnvelope>(&body).ok();
    let (kind, code, message) = match parsed {
        Some(ErrorEnvelope { error }) => (
            error.kind.unwrap_or_else(|| "api_error".into()),
            error.code,
            error.message.unwrap_or_default(),
        ),
        None => (
            "api_error".to_owned(),
            None,
            String::from_utf8_lossy(&body).chars().take(200).collect(),
        ),
    };
    let retry_after = retry_after(&headers);
    Err(Failure {
        retryable: should_retry(status, code.as_deref(), &headers),
        retry_after,
        error: StripeError::Api(ApiError {
            status: status.as_u16(),
            kind,
            code,
            message,
            request_id: header_str(&headers, "request-id").map(str::to_owned),
            retry_after,
        }),
    })
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Stripe's own word wins (`Stripe-Should-Retry`); otherwise retry what is transient: lock
/// timeouts (409), rate limits (429) and server errors (5xx).
fn should_retry(status: StatusCode, _code: Option<&str>, headers: &HeaderMap) -> bool {
    match header_str(headers, "stripe-should-retry") {
        Some("true") => true,
        Some("false") => false,
        _ => {
            status == StatusCode::CONFLICT
                || status == StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error()
        }
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header_str(headers, "retry-after")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && *secs >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Exponential backoff with full jitter over the upper half, at least the server's
/// `Retry-After`, never above the configured ceiling.
fn retry_delay(config: &StripeConfig, attempt: u32, server_hint: Option<Duration>) -> Duration {
    let exponential = config
        .retry_base_delay
        .saturating_mul(2u32.saturating_pow(attempt))
        .min(config.retry_max_delay);
    let jittered = exponential.mul_f64(0.5 + fastrand::f64() * 0.5);
    jittered
        .max(server_hint.unwrap_or_default())
        .min(config.retry_max_delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_cannot_escape() {
        assert_eq!(path_segment("cus_123"), "cus_123");
        assert_eq!(
            path_segment("../v1/charges?x=1"),
            "%2E%2E%2Fv1%2Fcharges%3Fx%3D1"
        );
        assert_eq!(path_segment(".."), "%2E%2E");
        assert_eq!(path_segment("a b"), "a%20b");
    }

    #[test]
    fn retry_delay_grows_honours_retry_after_and_is_capped() {
        let config = crate::config::Config::load(&Default::default())
            .unwrap()
            .stripe;
        for attempt in 0..4 {
            let d = retry_delay(&config, attempt, None);
            let ceiling = config.retry_base_delay * 2u32.pow(attempt);
            assert!(d <= ceiling && d >= ceiling / 2, "attempt {attempt}: {d:?}");
        }
        assert_eq!(
            retry_delay(&config, 0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            retry_delay(&config, 30, Some(Duration::from_secs(3600))),
            config.retry_max_delay
        );
    }
}
