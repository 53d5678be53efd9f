//! Flows against a wiremock Stripe: the exact requests Stripe documents for portal sessions,
//! and how profile pushes fail, back off, park and are retried.

mod support;

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
        .upsert_subscription(&SubscriptionMirror {
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
        })
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
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "data": [], "has_more": false})),
        )
        .mount(&w.stripe)
        .await;
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

on_every_store!(
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
