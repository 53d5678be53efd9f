//! Flows against a wiremock Stripe: the exact requests Stripe documents for portal sessions,
//! and how profile pushes fail, back off, park and are retried.

use crate::support;

use std::collections::BTreeMap;

use billsync::{
    domain::{LinkSource, StripeCustomerId, UserId},
    store::SubscriptionMirror,
};
use reqwest::Method;
use serde_json::{json, Value};
use support::{eventually, Backend, TestApp};
use wiremock::{
    matchers::{method, path},
    Mock, MockServer, Request, ResponseTemplate,
};

struct World {
    app: TestApp,
    stripe: MockServer,
    _store: support::TestStore,
}

async fn world(
    backend: Backend,
    test: &str,
    tweak: impl FnOnce(&mut billsync::config::Config),
) -> Option<World> {
    let store = backend.store(test).await?;
    let stripe = MockServer::start().await;
    let mut config = support::test_config(&stripe.uri());
    config.stripe.max_retries = 0;
    tweak(&mut config);
    let app = TestApp::spawn(store.store.clone(), &config).await;
    Some(World {
        app,
        stripe,
        _store: store,
    })
}

/// A user linked to `cus_<user>` directly in the store (no Stripe call), and their token.
async fn linked(w: &World, user: &str) -> String {
    w.app
        .put_user(
            user,
            json!({"email": format!("{user}@example.com"), "first_name": "Ada"}),
        )
        .await;
    let id = UserId::parse(user).unwrap();
    let customer = StripeCustomerId::parse(&format!("cus_{}", user.replace('-', ""))).unwrap();
    w.app
        .state
        .store
        .insert_link(&id, &customer, false, LinkSource::Created)
        .await
        .unwrap();
    support::user_token(user, Some(&format!("{user}@example.com")), None)
}

fn form(request: &Request) -> BTreeMap<String, String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(&request.body)
        .unwrap()
        .into_iter()
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> BTreeMap<String, String> {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn portal_sessions_send_what_stripe_documents(backend: Backend) {
    let test = "portal_sessions_send_what_stripe_documents";
    let Some(w) = world(backend, test, |c| {
        c.portal_configuration_id = Some("bpc_123".into())
    })
    .await
    else {
        return;
    };
    Mock::given(method("POST"))
        .and(path("/v1/billing_portal/sessions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"id": "bps_1", "object": "billing_portal.session", "url": "https://billing.stripe.com/p/session/test_1"}),
        ))
        .mount(&w.stripe)
        .await;
    let token = linked(&w, "portal-user").await;

    let response = w
        .app
        .as_user(Method::POST, "/api/billing/create-portal-session", &token)
        .json(&json!({"return_url": "https://evil.example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        422,
        "return_url is never taken from the request"
    );

    let plain: Value = w
        .app
        .as_user(Method::POST, "/api/billing/create-portal-session", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(plain["url"], "https://billing.stripe.com/p/session/test_1");

    let flow = w
        .app
        .as_user(Method::POST, "/api/billing/create-portal-session", &token)
        .json(&json!({"flow": "payment_method_update"}))
        .send()
        .await
        .unwrap();
    assert_eq!(flow.status(), 200);

    // Cancel needs a subscription; with none it is refused before calling Stripe.
    let none = w
        .app
        .as_user(Method::POST, "/api/billing/create-portal-session", &token)
        .json(&json!({"flow": "subscription_cancel"}))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 409);
    w.app
        .state
        .store
        .upsert_subscription_if_newer(
            &SubscriptionMirror {
                id: "sub_live".into(),
                user_id: Some(UserId::parse("portal-user").unwrap()),
                customer_id: "cus_portaluser".into(),
                status: "active".into(),
                price_id: None,
                cancel_at_period_end: false,
                current_period_end: None,
                updated_at: billsync::store::now(),
                cancel_at: None,
                canceled_at: None,
                ended_at: None,
                items: vec![],
            },
            0,
            "evt_fixture",
        )
        .await
        .unwrap();
    let cancel = w
        .app
        .as_user(Method::POST, "/api/billing/create-portal-session", &token)
        .json(&json!({"flow": "subscription_cancel"}))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);

    let requests = w.stripe.received_requests().await.unwrap();
    assert_eq!(requests.len(), 3);
    let base = [
        ("customer", "cus_portaluser"),
        ("return_url", "https://app.example.com/billing"),
        ("configuration", "bpc_123"),
    ];
    assert_eq!(form(&requests[0]), pairs(&base));
    let mut with_flow = base.to_vec();
    with_flow.push(("flow_data[type]", "payment_method_update"));
    assert_eq!(form(&requests[1]), pairs(&with_flow));
    let mut with_cancel = base.to_vec();
    with_cancel.push(("flow_data[type]", "subscription_cancel"));
    with_cancel.push(("flow_data[subscription_cancel][subscription]", "sub_live"));
    assert_eq!(form(&requests[2]), pairs(&with_cancel));
    for request in &requests {
        assert!(request.headers.contains_key("stripe-version"));
    }
}

async fn portal_without_app_url_is_503(backend: Backend) {
    let Some(w) = world(backend, "portal_without_app_url_is_503", |c| {
        c.app_url = None
    })
    .await
    else {
        return;
    };
    let token = linked(&w, "no-app-url").await;
    let response = w
        .app
        .as_user(Method::POST, "/api/billing/create-portal-session", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(w.stripe.received_requests().await.unwrap().is_empty());
}

async fn outbox_jobs(w: &World, state: &str) -> Vec<Value> {
    let body: Value = w
        .app
        .admin(Method::GET, &format!("/v1/outbox?state={state}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["jobs"].as_array().unwrap().clone()
}

async fn refused_pushes_park_and_can_be_retried(backend: Backend) {
    let Some(w) = world(backend, "refused_pushes_park_and_can_be_retried", |_| {}).await else {
        return;
    };
    let token = linked(&w, "parked").await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": {"type": "invalid_request_error", "code": "parameter_invalid", "message": "Invalid phone"}}),
        ))
        .up_to_n_times(1)
        .mount(&w.stripe)
        .await;
    w.app
        .as_user(Method::PUT, "/api/user/profile", &token)
        .json(&json!({"phone": "+14155550100"}))
        .send()
        .await
        .unwrap();
    let failed = eventually(10, "a failed job", || async {
        outbox_jobs(&w, "failed").await.pop()
    })
    .await;
    assert_eq!(failed["attempts"], 1, "a refusal is not retried");
    assert_eq!(failed["kind"], "push_profile");
    assert!(failed["last_error"]
        .as_str()
        .unwrap()
        .contains("Invalid phone"));

    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"id": "cus_parked", "metadata": {}})),
        )
        .mount(&w.stripe)
        .await;
    let id = failed["id"].as_i64().unwrap();
    let retried = w
        .app
        .admin(Method::POST, &format!("/v1/outbox/{id}/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    let body: Value = retried.json().await.unwrap();
    assert_eq!(body["job"]["state"], "pending");
    eventually(10, "the retried push", || async {
        let done = outbox_jobs(&w, "done").await;
        done.iter().any(|j| j["id"] == id).then_some(())
    })
    .await;
    assert_eq!(w.stripe.received_requests().await.unwrap().len(), 2);
    // Retrying a job that is not failed, or does not exist.
    let again = w
        .app
        .admin(Method::POST, &format!("/v1/outbox/{id}/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let missing = w
        .app
        .admin(Method::POST, "/v1/outbox/999999/retry")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let bad = w
        .app
        .admin(Method::GET, "/v1/outbox?state=sideways")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
}

async fn transient_failures_back_off_and_give_up(backend: Backend) {
    let Some(w) = world(backend, "transient_failures_back_off_and_give_up", |c| {
        c.outbox.max_attempts = 3
    })
    .await
    else {
        return;
    };
    let token = linked(&w, "flaky").await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(503)
                .set_body_json(json!({"error": {"type": "api_error", "message": "down"}})),
        )
        .mount(&w.stripe)
        .await;
    w.app
        .as_user(Method::PUT, "/api/user/profile", &token)
        .json(&json!({"lastName": "Flaky"}))
        .send()
        .await
        .unwrap();
    let failed = eventually(15, "the job to give up", || async {
        outbox_jobs(&w, "failed").await.pop()
    })
    .await;
    assert_eq!(failed["attempts"], 3);
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{failed}"
    );
    assert_eq!(w.stripe.received_requests().await.unwrap().len(), 3);
}

async fn retry_after_is_honoured(backend: Backend) {
    let Some(w) = world(backend, "retry_after_is_honoured", |_| {}).await else {
        return;
    };
    let token = linked(&w, "slowdown").await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "2")
                .set_body_json(json!({"error": {"type": "invalid_request_error", "code": "rate_limit", "message": "slow"}})),
        )
        .up_to_n_times(1)
        .mount(&w.stripe)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"id": "cus_slowdown", "metadata": {}})),
        )
        .mount(&w.stripe)
        .await;
    w.app
        .as_user(Method::PUT, "/api/user/profile", &token)
        .json(&json!({"lastName": "Later"}))
        .send()
        .await
        .unwrap();
    eventually(10, "the pushed profile", || async {
        (w.stripe.received_requests().await.unwrap().len() == 2).then_some(())
    })
    .await;
    let requests = w.stripe.received_requests().await.unwrap();
    // wiremock does not timestamp requests; the job's own record shows the wait. (The job is
    // marked done just after Stripe answered.)
    let job = eventually(10, "the job marked done", || async {
        outbox_jobs(&w, "done").await.pop()
    })
    .await;
    let job = &job;
    let created = time::OffsetDateTime::parse(
        job["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let finished = time::OffsetDateTime::parse(
        job["updated_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(
        finished - created >= time::Duration::seconds(2),
        "waited {:?}",
        finished - created
    );
    assert_eq!(job["attempts"], 2);
    assert_eq!(form(&requests[1])["name"], "Ada Later");
}

async fn a_lost_create_is_replayed_identically_after_a_profile_edit(backend: Backend) {
    let test = "a_lost_create_is_replayed_identically_after_a_profile_edit";
    let Some(w) = world(backend, test, |c| {
        c.stripe.timeout = std::time::Duration::from_millis(300)
    })
    .await
    else {
        return;
    };
    no_customers_listed(&w.stripe).await;
    // Stripe makes the customer but the answer is lost (slower than our timeout)...
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "cus_lost", "object": "customer", "metadata": {}}))
                .set_delay(std::time::Duration::from_secs(2)),
        )
        .up_to_n_times(1)
        .mount(&w.stripe)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "cus_lost", "object": "customer", "metadata": {}})),
        )
        .mount(&w.stripe)
        .await;
    w.app
        .put_user(
            "lost",
            json!({"email": "first@example.com", "first_name": "First"}),
        )
        .await;
    let (status, body) = w.app.resolve("lost").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("stripe_unavailable"))
    );
    // ...the profile changes before the retry...
    w.app
        .put_user(
            "lost",
            json!({"email": "second@example.com", "first_name": "Second"}),
        )
        .await;
    let (status, body) = w.app.resolve("lost").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["customer_id"], "cus_lost");
    // ...and the retry was the very same request: Stripe would answer it with the first customer.
    let creates: Vec<Request> = w
        .stripe
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.method.as_str() == "POST")
        .collect();
    assert_eq!(creates.len(), 2);
    let key = |r: &Request| {
        r.headers
            .get("idempotency-key")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(key(&creates[0]), key(&creates[1]));
    assert_eq!(form(&creates[0]), form(&creates[1]));
    assert_eq!(form(&creates[1])["email"], "first@example.com");
}

async fn stripe_refusing_a_create_is_422(backend: Backend) {
    let Some(w) = world(backend, "stripe_refusing_a_create_is_422", |_| {}).await else {
        return;
    };
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "data": [], "has_more": false})),
        )
        .mount(&w.stripe)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": {"type": "invalid_request_error", "code": "email_invalid", "param": "email", "message": "Invalid email address: x"}}),
        ))
        .mount(&w.stripe)
        .await;
    w.app
        .put_user("refused", json!({"email": "odd@example.com"}))
        .await;
    let (status, body) = w.app.resolve("refused").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("stripe_rejected"))
    );
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Invalid email address"),
        "Stripe text may echo input: {body}"
    );
}

/// Stripe's customer list answers empty, whatever the filter.
async fn no_customers_listed(stripe: &MockServer) {
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "data": [], "has_more": false})),
        )
        .mount(stripe)
        .await;
}

fn search_result(customers: Vec<Value>) -> Value {
    json!({"object": "search_result", "url": "/v1/customers/search", "has_more": false,
           "next_page": null, "data": customers})
}

fn stripe_customer(id: &str, email: &str, metadata: Value) -> Value {
    json!({"id": id, "object": "customer", "email": email, "name": null, "phone": null,
           "metadata": metadata, "livemode": false, "created": 1_700_000_000})
}

/// What Stripe's email list cannot find, its Search API can: a customer made for this user
/// whose email changed since, and one whose email has capitals (the list filter is
/// case-sensitive). Where search is absent (404/400), resolve creates, as before.
async fn search_finds_what_the_email_list_cannot(backend: Backend) {
    let Some(w) = world(backend, "search_finds_what_the_email_list_cannot", |_| {}).await else {
        return;
    };
    no_customers_listed(&w.stripe).await;
    // Made for `moved` under an address they have since changed.
    Mock::given(method("GET"))
        .and(path("/v1/customers/search"))
        .and(wiremock::matchers::query_param(
            "query",
            r#"metadata["userId"]:"moved""#,
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(search_result(vec![
            stripe_customer(
                "cus_Moved",
                "old-address@example.com",
                json!({"userId": "moved"}),
            ),
        ])))
        .mount(&w.stripe)
        .await;
    // Created elsewhere with capitals in its email; nobody's.
    Mock::given(method("GET"))
        .and(path("/v1/customers/search"))
        .and(wiremock::matchers::query_param(
            "query",
            r#"email:"capitals@example.com""#,
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(search_result(vec![
            stripe_customer("cus_Capitals", "Capitals@Example.com", json!({})),
            // Search matches loosely: another address is never taken for this one.
            stripe_customer("cus_Other", "capitals@example.com.evil", json!({})),
        ])))
        .mount(&w.stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/search"))
        .respond_with(ResponseTemplate::new(200).set_body_json(search_result(vec![])))
        .mount(&w.stripe)
        .await;
    // Stamping metadata.userId on an email-linked customer.
    Mock::given(method("POST"))
        .and(path("/v1/customers/cus_Capitals"))
        .respond_with(ResponseTemplate::new(200).set_body_json(stripe_customer(
            "cus_Capitals",
            "Capitals@Example.com",
            json!({"userId": "capitals"}),
        )))
        .mount(&w.stripe)
        .await;

    w.app
        .put_user("moved", json!({"email": "new-address@example.com"}))
        .await;
    let (status, body) = w.app.resolve("moved").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["customer_id"].as_str(), body["source"].as_str()),
        (Some("cus_Moved"), Some("stripe_metadata"))
    );

    w.app
        .put_user(
            "capitals",
            json!({"email": "capitals@example.com", "email_verified": true}),
        )
        .await;
    let (status, body) = w.app.resolve("capitals").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["customer_id"].as_str(), body["source"].as_str()),
        (Some("cus_Capitals"), Some("stripe_email"))
    );
    let requests = w.stripe.received_requests().await.unwrap();
    assert!(
        !requests
            .iter()
            .any(|r| r.method.as_str() == "POST" && r.url.path() == "/v1/customers"),
        "no customer created"
    );
    let searched = requests
        .iter()
        .filter(|r| r.url.path() == "/v1/customers/search")
        .count();
    assert_eq!(
        searched, 3,
        "metadata for moved; metadata, then email, for capitals"
    );
}

async fn no_search_here_is_no_error(backend: Backend) {
    let Some(w) = world(backend, "no_search_here_is_no_error", |_| {}).await else {
        return;
    };
    no_customers_listed(&w.stripe).await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/search"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "type": "invalid_request_error",
            "message": "Search is not available for this account."}})))
        .mount(&w.stripe)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(stripe_customer(
            "cus_Fresh",
            "fresh@example.com",
            json!({"userId": "fresh"}),
        )))
        .mount(&w.stripe)
        .await;
    w.app
        .put_user("fresh", json!({"email": "fresh@example.com"}))
        .await;
    let (status, body) = w.app.resolve("fresh").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "created");
    let searched = w
        .stripe
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == "/v1/customers/search")
        .count();
    assert_eq!(
        searched, 1,
        "the email search is skipped once search said no"
    );
}

/// Stripe's list `email` filter is case-sensitive: a customer made as `Ada.Given@Example.com`
/// (Checkout, the Dashboard, the app's old code) is listed only under that spelling. Resolve
/// asks for the address as the app gave it too, so it links that customer instead of making a
/// duplicate — with no search to fall back on.
async fn the_address_as_given_is_listed_too(backend: Backend) {
    let Some(w) = world(backend, "the_address_as_given_is_listed_too", |_| {}).await else {
        return;
    };
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .and(wiremock::matchers::query_param(
            "email",
            "Ada.Given@Example.com",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "object": "list", "has_more": false,
            "data": [stripe_customer("cus_Given", "Ada.Given@Example.com", json!({}))],
        })))
        .mount(&w.stripe)
        .await;
    no_customers_listed(&w.stripe).await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/search"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"error": {
            "type": "invalid_request_error", "message": "Unrecognized request URL"}})))
        .mount(&w.stripe)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/customers/cus_Given"))
        .respond_with(ResponseTemplate::new(200).set_body_json(stripe_customer(
            "cus_Given",
            "Ada.Given@Example.com",
            json!({"userId": "given"}),
        )))
        .mount(&w.stripe)
        .await;
    let user = w
        .app
        .put_user(
            "given",
            json!({"email": " Ada.Given@Example.com ", "email_verified": true}),
        )
        .await;
    assert_eq!(
        user["user"]["email"], "ada.given@example.com",
        "kept normalised"
    );
    let (status, body) = w.app.resolve("given").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["customer_id"].as_str(), body["source"].as_str()),
        (Some("cus_Given"), Some("stripe_email"))
    );
    let listed: Vec<String> = w
        .stripe
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "GET" && r.url.path() == "/v1/customers")
        .filter_map(|r| {
            r.url
                .query_pairs()
                .find(|(k, _)| k == "email")
                .map(|(_, v)| v.into_owned())
        })
        .collect();
    assert_eq!(
        listed,
        ["ada.given@example.com", "Ada.Given@Example.com"],
        "normalised first, then as given"
    );
}

/// The export holds everything: Stripe's objects passed through whole and paged, what
/// billsync itself keeps (stored webhook payloads, the profile pushed, outbox jobs, audit
/// entries), and a warning for a section Stripe could not give.
async fn the_export_passes_everything_through(backend: Backend) {
    let Some(w) = world(backend, "the_export_passes_everything_through", |_| {}).await else {
        return;
    };
    let token = linked(&w, "exported").await;
    let customer = "cus_exported";
    Mock::given(method("GET"))
        .and(path(format!("/v1/customers/{customer}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": customer, "object": "customer", "email": "exported@example.com",
            "address": {"line1": "1 Analytical Way", "city": "London", "country": "GB"},
            "shipping": {"name": "Ada", "address": {"city": "Paris"}},
            "description": "first customer", "tax_exempt": "none",
            "invoice_settings": {"default_payment_method": "pm_1"},
            "something_new_in_a_later_api": {"kept": true}, "metadata": {}})))
        .mount(&w.stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "object": "list", "has_more": false,
            "data": [{"id": "sub_1", "object": "subscription", "customer": customer,
                      "status": "active", "cancel_at": 1_900_000_000,
                      "items": {"object": "list", "data": []}}]})))
        .mount(&w.stripe)
        .await;
    // Two pages of invoices.
    Mock::given(method("GET"))
        .and(path("/v1/invoices"))
        .and(wiremock::matchers::query_param("starting_after", "in_1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "object": "list", "has_more": false,
            "data": [{"id": "in_2", "object": "invoice", "total": 2000}]})))
        .mount(&w.stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/invoices"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "object": "list", "has_more": true,
            "data": [{"id": "in_1", "object": "invoice", "total": 1000}]})))
        .mount(&w.stripe)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/v1/customers/{customer}/payment_methods")))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({
            "error": {"type": "api_error", "message": "induced"}})))
        .mount(&w.stripe)
        .await;
    let event = json!({"id": "evt_exported", "object": "event", "type": "invoice.paid",
        "created": 1_700_000_000, "livemode": false,
        "data": {"object": {"id": "in_1", "object": "invoice", "customer": customer,
                            "customer_email": "exported@example.com"}}})
    .to_string();
    w.app.deliver_webhook(&event).await;
    let user = UserId::parse("exported").unwrap();
    w.app
        .state
        .store
        .append_audit(
            "admin",
            "export_requested",
            Some(&billsync::gdpr::subject_hash(&user)),
            &json!({"via": "test"}),
        )
        .await
        .unwrap();

    let response = w
        .app
        .as_user(Method::GET, "/api/user/export-data", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let export: Value = response.json().await.unwrap();
    let stripe_customer = &export["stripe_customer"];
    assert_eq!(stripe_customer["address"]["line1"], "1 Analytical Way");
    assert_eq!(stripe_customer["shipping"]["address"]["city"], "Paris");
    assert_eq!(stripe_customer["description"], "first customer");
    assert_eq!(
        stripe_customer["something_new_in_a_later_api"]["kept"],
        true
    );
    assert_eq!(
        export["stripe_subscriptions"][0]["cancel_at"],
        1_900_000_000
    );
    let invoices: Vec<&str> = export["stripe_invoices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(invoices, ["in_1", "in_2"], "every page");
    assert!(export["stripe_payment_methods"].is_null());
    assert_eq!(
        export["warnings"],
        json!(["stripe_payment_methods could not be retrieved from Stripe"])
    );
    assert_eq!(export["stored_webhook_events"][0]["id"], "evt_exported");
    assert_eq!(
        export["stored_webhook_events"][0]["data"]["object"]["customer_email"],
        "exported@example.com"
    );
    assert_eq!(export["audit_entries"][0]["action"], "export_requested");
    assert!(export["outbox_jobs"].is_array());
    assert!(export.as_object().unwrap().contains_key("pushed_profile"));
}

on_every_store!(
    the_export_passes_everything_through,
    search_finds_what_the_email_list_cannot,
    the_address_as_given_is_listed_too,
    no_search_here_is_no_error,
    a_lost_create_is_replayed_identically_after_a_profile_edit,
    stripe_refusing_a_create_is_422,
    portal_sessions_send_what_stripe_documents,
    portal_without_app_url_is_503,
    refused_pushes_park_and_can_be_retried,
    transient_failures_back_off_and_give_up,
    retry_after_is_honoured,
);

#[tokio::test]
async fn openapi_describes_every_route() {
    let store = support::sqlite_store().await;
    let app = TestApp::spawn(
        store.store.clone(),
        &support::test_config("http://127.0.0.1:9"),
    )
    .await;
    let doc: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for (route, verb) in [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/v1/users/{user_id}", "put"),
        ("/v1/users/{user_id}", "get"),
        ("/v1/users/batch", "post"),
        ("/v1/users/{user_id}/customer", "post"),
        ("/v1/outbox", "get"),
        ("/v1/outbox/{id}/retry", "post"),
        ("/api/user/profile", "put"),
        ("/api/billing/create-portal-session", "post"),
        ("/api/user/export-data", "get"),
        ("/api/user/delete-account", "delete"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(route).and_then(|p| p.get(verb)).is_some(),
            "{verb} {route} missing"
        );
    }
    assert!(doc["components"]["securitySchemes"]["user_jwt"].is_object());
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
}
