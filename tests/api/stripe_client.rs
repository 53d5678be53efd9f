//! The Stripe client against wiremock: the exact requests Stripe documents, and its behaviour
//! on faults (retries, idempotency keys, timeouts, errors).

use crate::support;

mod conformance;
mod webhook_setup;

use std::{collections::BTreeMap, time::Duration};

use billsync::{
    config::DEFAULT_STRIPE_API_VERSION,
    stripe::{CustomerParams, StripeClient, StripeError},
};
use serde_json::json;
use wiremock::{
    matchers::{method, path},
    Mock, MockServer, Request, ResponseTemplate,
};

fn customer_json(id: &str) -> serde_json::Value {
    json!({"id": id, "object": "customer", "email": "ada@example.com", "metadata": {}, "livemode": false, "created": 1})
}

fn client(server: &MockServer, max_retries: u32, timeout_ms: u64) -> StripeClient {
    let mut config = support::test_config(&server.uri());
    config.stripe.max_retries = max_retries;
    config.stripe.timeout = Duration::from_millis(timeout_ms);
    config.stripe.connect_timeout = Duration::from_millis(timeout_ms);
    StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap()).unwrap()
}

fn header<'r>(request: &'r Request, name: &str) -> Option<&'r str> {
    request.headers.get(name).and_then(|v| v.to_str().ok())
}

fn form(request: &Request) -> BTreeMap<String, String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(&request.body)
        .unwrap()
        .into_iter()
        .collect()
}

fn params() -> CustomerParams {
    CustomerParams {
        email: Some("ada@example.com".into()),
        name: Some("Ada Lovelace".into()),
        phone: None,
        metadata: [
            ("userId".to_owned(), "user 1&2".to_owned()),
            ("source".to_owned(), "billsync".to_owned()),
        ]
        .into_iter()
        .collect(),
    }
}

#[tokio::test]
async fn create_sends_stripes_form_encoding_and_headers() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer_json("cus_1")))
        .expect(1)
        .mount(&server)
        .await;
    let customer = client(&server, 2, 2_000)
        .create_customer(&params(), "key-123")
        .await
        .unwrap();
    assert_eq!(customer.id, "cus_1");

    let requests = server.received_requests().await.unwrap();
    let request = &requests[0];
    assert_eq!(
        header(request, "authorization"),
        Some(&*format!("Bearer {}", support::STRIPE_KEY))
    );
    assert_eq!(
        header(request, "stripe-version"),
        Some(DEFAULT_STRIPE_API_VERSION)
    );
    assert_eq!(header(request, "idempotency-key"), Some("key-123"));
    assert_eq!(
        header(request, "content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let expected: BTreeMap<String, String> = [
        ("email", "ada@example.com"),
        ("name", "Ada Lovelace"),
        ("metadata[source]", "billsync"),
        ("metadata[userId]", "user 1&2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(form(request), expected);
    // Brackets travel unescaped, as Stripe's own libraries send them.
    assert!(String::from_utf8_lossy(&request.body).contains("metadata[userId]=user+1%262"));
}

#[tokio::test]
async fn server_errors_are_retried_with_the_same_idempotency_key() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_json(json!({"error": {"type": "api_error", "message": "boom"}})),
        )
        .up_to_n_times(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer_json("cus_2")))
        .mount(&server)
        .await;
    let stripe = client(&server, 2, 2_000);
    // No key given: the client makes one and keeps it across attempts.
    let customer = stripe
        .update_customer("cus_2", &params(), None)
        .await
        .unwrap();
    assert_eq!(customer.id, "cus_2");
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 3);
    let keys: Vec<_> = requests
        .iter()
        .map(|r| header(r, "idempotency-key").unwrap().to_owned())
        .collect();
    assert!(!keys[0].is_empty());
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    assert_eq!(stripe.attempts_sent(), 3);
}

#[tokio::test]
async fn rate_limits_are_retried_after_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "0.15")
                .set_body_json(json!({"error": {"type": "invalid_request_error", "code": "rate_limit", "message": "slow down"}})),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer_json("cus_3")))
        .mount(&server)
        .await;
    let started = std::time::Instant::now();
    let customer = client(&server, 2, 2_000)
        .create_customer(&params(), "key-429")
        .await
        .unwrap();
    assert_eq!(customer.id, "cus_3");
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "Retry-After was not honoured"
    );
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    assert!(requests
        .iter()
        .all(|r| header(r, "idempotency-key") == Some("key-429")));
}

#[tokio::test]
async fn client_errors_are_not_retried_and_are_typed() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400)
                .insert_header("Request-Id", "req_abc")
                .set_body_json(json!({"error": {
                    "type": "invalid_request_error", "code": "email_invalid",
                    "message": "Invalid email address: nope", "param": "email"}})),
        )
        .mount(&server)
        .await;
    let err = client(&server, 3, 2_000)
        .create_customer(&params(), "key-400")
        .await
        .unwrap_err();
    let StripeError::Api(api) = &err else {
        panic!("expected an API error, got {err:?}")
    };
    assert_eq!(api.status, 400);
    assert_eq!(api.kind, "invalid_request_error");
    assert_eq!(api.code.as_deref(), Some("email_invalid"));
    assert_eq!(api.message, "Invalid email address: nope");
    assert_eq!(api.request_id.as_deref(), Some("req_abc"));
    assert!(!err.is_unavailable());
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn stripe_should_retry_false_is_obeyed() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).insert_header("Stripe-Should-Retry", "false"))
        .mount(&server)
        .await;
    let err = client(&server, 3, 2_000)
        .create_customer(&params(), "k")
        .await
        .unwrap_err();
    assert!(err.is_unavailable());
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_timeout_is_unavailable_after_its_retries() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(customer_json("cus_slow"))
                .set_delay(Duration::from_secs(2)),
        )
        .mount(&server)
        .await;
    let err = client(&server, 1, 200)
        .retrieve_customer("cus_slow")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StripeError::Transport {
                timed_out: true,
                ..
            }
        ),
        "expected a timeout, got {err:?}"
    );
    assert!(err.is_unavailable());
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_refused_connection_is_unavailable_and_names_no_secret() {
    let config = {
        let mut c = support::test_config("http://127.0.0.1:9");
        c.stripe.max_retries = 1;
        c
    };
    let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap()).unwrap();
    let err = stripe.retrieve_customer("cus_x").await.unwrap_err();
    assert!(
        matches!(
            err,
            StripeError::Transport {
                timed_out: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.to_string().contains(support::STRIPE_KEY));
    assert_eq!(stripe.attempts_sent(), 2);
}

#[tokio::test]
async fn gets_carry_no_idempotency_key_and_lists_page_through() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .and(wiremock::matchers::query_param("starting_after", "cus_b"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "object": "list", "has_more": false,
            "data": [customer_json("cus_c")]})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "object": "list", "has_more": true,
            "data": [customer_json("cus_a"), customer_json("cus_b")]})))
        .mount(&server)
        .await;
    let found = client(&server, 0, 2_000)
        .customers_by_email("ada@example.com")
        .await
        .unwrap();
    let ids: Vec<_> = found.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["cus_a", "cus_b", "cus_c"]);
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(header(request, "idempotency-key"), None);
        let query: BTreeMap<String, String> = request.url.query_pairs().into_owned().collect();
        assert_eq!(query["email"], "ada@example.com");
        assert_eq!(query["limit"], "100");
    }
}

#[tokio::test]
async fn ids_cannot_escape_their_path_segment() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404).set_body_json(
            json!({"error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such customer"}}),
        ))
        .mount(&server)
        .await;
    let err = client(&server, 0, 2_000)
        .retrieve_customer("../charges?limit=1")
        .await
        .unwrap_err();
    assert!(err.is_not_found());
    let requests = server.received_requests().await.unwrap();
    assert_eq!(
        requests[0].url.path(),
        "/v1/customers/%2E%2E%2Fcharges%3Flimit%3D1"
    );
    assert_eq!(requests[0].url.query(), None);
}

fn budgeted_client(server: &MockServer, budget_rps: u32, timeout_ms: u64) -> StripeClient {
    let mut config = support::test_config(&server.uri());
    config.stripe.budget_rps = budget_rps;
    config.stripe.max_retries = 0;
    config.stripe.timeout = Duration::from_millis(timeout_ms);
    StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap()).unwrap()
}

async fn customers_answer(server: &MockServer) {
    Mock::given(method("GET"))
        .respond_with(|request: &Request| {
            let id = request.url.path().trim_start_matches("/v1/customers/");
            ResponseTemplate::new(200).set_body_json(customer_json(id))
        })
        .mount(server)
        .await;
}

/// Waits (polling, no deadline asserted) until `n` calls were sent or wait for a permit.
async fn until_in_line(stripe: &StripeClient, n: usize) {
    while stripe.attempts_sent() as usize + stripe.waiting_for_budget() < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_call_is_sent_before_queued_background_ones() {
    let server = MockServer::start().await;
    customers_answer(&server).await;
    // 2 a second: the background backlog takes two seconds to drain.
    let stripe = budgeted_client(&server, 2, 10_000);
    let mut calls = Vec::new();
    for i in 0..4 {
        let stripe_ = stripe.clone();
        calls.push(tokio::spawn(async move {
            stripe_.retrieve_customer(&format!("cus_b{i}")).await
        }));
        // The first is sent at once (the budget was idle); the others queue in order.
        until_in_line(&stripe, i + 1).await;
    }
    let interactive = billsync::stripe::with_priority(
        billsync::stripe::Priority::Interactive,
        stripe.retrieve_customer("cus_person"),
    )
    .await
    .unwrap();
    assert_eq!(interactive.id, "cus_person");
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let order: Vec<String> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| r.url.path().trim_start_matches("/v1/customers/").to_owned())
        .collect();
    assert_eq!(
        order,
        ["cus_b0", "cus_person", "cus_b1", "cus_b2", "cus_b3"],
        "the person's call overtakes the queued background calls"
    );
}

#[tokio::test]
async fn a_call_that_gets_no_permit_in_time_is_unavailable_and_not_sent() {
    let server = MockServer::start().await;
    customers_answer(&server).await;
    // One a second, and a 300 ms timeout bounding the wait for a permit.
    let stripe = budgeted_client(&server, 1, 300);
    stripe.retrieve_customer("cus_first").await.unwrap();
    let err = billsync::stripe::with_priority(
        billsync::stripe::Priority::Interactive,
        stripe.retrieve_customer("cus_second"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StripeError::BudgetExhausted), "{err:?}");
    assert!(err.is_unavailable(), "retried later, never parked");
    let api = billsync::error::ApiError::from(err);
    assert_eq!(
        (api.status().as_u16(), api.code()),
        (503, "stripe_unavailable")
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    assert_eq!(stripe.waiting_for_budget(), 0, "the waiter left the line");
}

/// Only the wait for permits counts against the bound, not the attempts: a retry after an
/// attempt that timed out is still sent with its idempotency key (giving up here would leave
/// the change to a job's next claim, under a new key, and could apply it twice).
#[tokio::test]
async fn a_retry_after_a_timed_out_attempt_still_gets_its_permit() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(customer_json("cus_slow"))
                .set_delay(Duration::from_secs(3)),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer_json("cus_slow")))
        .mount(&server)
        .await;
    // One permit a second and an 800 ms timeout: the retry's permit, due at 1 s, comes after
    // the first attempt's timeout but well within the time left to wait.
    let mut config = support::test_config(&server.uri());
    config.stripe.budget_rps = 1;
    config.stripe.max_retries = 1;
    config.stripe.timeout = Duration::from_millis(800);
    let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap()).unwrap();
    let customer = stripe
        .update_customer("cus_slow", &params(), Some("key-slow"))
        .await
        .unwrap();
    assert_eq!(customer.id, "cus_slow");
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    assert!(requests
        .iter()
        .all(|r| header(r, "idempotency-key") == Some("key-slow")));
}
