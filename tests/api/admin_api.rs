//! The admin API through a real server: authentication, validation and error shapes, and what
//! happens when Stripe cannot be reached. Needs no Stripe: a closed port stands in for it.

use crate::support;

use reqwest::Method;
use serde_json::{json, Value};
use support::{Backend, TestApp};

/// Nothing listens here: every Stripe call is refused.
const DEAD_STRIPE: &str = "http://127.0.0.1:9";

async fn app(backend: Backend, test: &str) -> Option<(TestApp, support::TestStore)> {
    let store = backend.store(test).await?;
    let mut config = support::test_config(DEAD_STRIPE);
    config.stripe.max_retries = 1;
    Some((TestApp::spawn(store.store.clone(), &config).await, store))
}

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("errors are JSON");
    let code = body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_owned();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    (status, code)
}

async fn admin_routes_need_the_key(backend: Backend) {
    let Some((app, _s)) = app(backend, "admin_routes_need_the_key").await else {
        return;
    };
    let url = app.url("/v1/users/u1");
    let none = app.http.get(&url).send().await.unwrap();
    assert_eq!(error_of(none).await, (401, "unauthorized".into()));
    let wrong = app
        .http
        .get(&url)
        .bearer_auth("not-the-key-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(wrong).await, (401, "unauthorized".into()));
    let prefix = app
        .http
        .get(&url)
        .bearer_auth(&support::ADMIN_KEY[..10])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(prefix).await, (401, "unauthorized".into()));
    let basic = app
        .http
        .get(&url)
        .basic_auth(support::ADMIN_KEY, Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(basic).await, (401, "unauthorized".into()));
    let right = app.admin(Method::GET, "/v1/users/u1").send().await.unwrap();
    assert_eq!(error_of(right).await, (404, "user_not_found".into()));
}

async fn admin_routes_are_off_without_a_key(backend: Backend) {
    let Some(store) = backend.store("admin_routes_are_off_without_a_key").await else {
        return;
    };
    let mut config = support::test_config(DEAD_STRIPE);
    config.admin_api_key = None;
    let app = TestApp::spawn(store.store.clone(), &config).await;
    let response = app.admin(Method::GET, "/v1/users/u1").send().await.unwrap();
    assert_eq!(error_of(response).await, (503, "admin_disabled".into()));
    // Health is not an admin route.
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

async fn users_are_created_read_and_replaced(backend: Backend) {
    let Some((app, _s)) = app(backend, "users_are_created_read_and_replaced").await else {
        return;
    };
    let created = app
        .put_user(
            "user-1",
            json!({"email": " Ada@Example.COM ", "email_verified": true,
                   "first_name": "Ada", "last_name": "Lovelace", "phone": "+14155550123"}),
        )
        .await;
    let user = &created["user"];
    assert_eq!(user["id"], "user-1");
    assert_eq!(user["email"], "ada@example.com");
    assert_eq!(user["email_verified"], true);
    assert_eq!(user["first_name"], "Ada");
    assert_eq!(user["phone"], "+14155550123");
    assert_eq!(user["version"], 1);

    let read: Value = app
        .admin(Method::GET, "/v1/users/user-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["user"], *user);
    assert_eq!(read["customer"], Value::Null);

    // PUT replaces: omitted fields are cleared, email_verified defaults to false.
    let replaced = app
        .put_user("user-1", json!({"email": "ada@example.com", "phone": ""}))
        .await;
    assert_eq!(replaced["user"]["first_name"], Value::Null);
    assert_eq!(replaced["user"]["phone"], Value::Null);
    assert_eq!(replaced["user"]["email_verified"], false);
    assert_eq!(replaced["user"]["version"], 2);
    // Unchanged: same version.
    let same = app
        .put_user("user-1", json!({"email": "ada@example.com"}))
        .await;
    assert_eq!(same["user"]["version"], 2);
}

async fn bad_input_gets_clear_errors(backend: Backend) {
    let Some((app, _s)) = app(backend, "bad_input_gets_clear_errors").await else {
        return;
    };
    let put = |body: &'static str| {
        app.admin(Method::PUT, "/v1/users/u1")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(
        error_of(put("{\"email\":").await.unwrap()).await,
        (400, "invalid_json".into())
    );
    assert_eq!(
        error_of(put("not json").await.unwrap()).await,
        (400, "invalid_json".into())
    );
    assert_eq!(
        error_of(put("{}").await.unwrap()).await,
        (422, "invalid_request".into())
    );
    assert_eq!(
        error_of(put("{\"email\": 42}").await.unwrap()).await,
        (422, "invalid_request".into())
    );
    assert_eq!(
        error_of(
            put("{\"email\": \"a@b.co\", \"emial_verified\": true}")
                .await
                .unwrap()
        )
        .await,
        (422, "invalid_request".into())
    );
    assert_eq!(
        error_of(put("{\"email\": \"not-an-email\"}").await.unwrap()).await,
        (422, "invalid_email".into())
    );
    assert_eq!(
        error_of(
            put("{\"email\": \"a@b.co\", \"phone\": \"555-1234\"}")
                .await
                .unwrap()
        )
        .await,
        (422, "invalid_phone".into())
    );
    let long_name = format!(
        "{{\"email\": \"a@b.co\", \"first_name\": \"{}\"}}",
        "x".repeat(101)
    );
    let response = app
        .admin(Method::PUT, "/v1/users/u1")
        .body(long_name)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await, (422, "invalid_name".into()));

    let huge = format!(
        "{{\"email\": \"a@b.co\", \"first_name\": \"{}\"}}",
        "x".repeat(1024 * 1024)
    );
    let response = app
        .admin(Method::PUT, "/v1/users/u1")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await, (413, "payload_too_large".into()));

    let response = app
        .admin(Method::GET, "/v1/users/%20padded")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await, (422, "invalid_user_id".into()));
    let response = app
        .admin(Method::GET, "/v1/nothing-here")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await, (404, "not_found".into()));
    let response = app
        .admin(Method::DELETE, "/v1/users/u1")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await, (405, "method_not_allowed".into()));
    // Nothing was stored by any of these.
    let response = app.admin(Method::GET, "/v1/users/u1").send().await.unwrap();
    assert_eq!(error_of(response).await, (404, "user_not_found".into()));
}

async fn hostile_user_ids_round_trip(backend: Backend) {
    let Some((app, _s)) = app(backend, "hostile_user_ids_round_trip").await else {
        return;
    };
    for id in [
        "x'; DROP TABLE users; --",
        "a/b?c=d#e",
        "{\"$ne\": null}",
        "ünïcødé 用户",
        "%00",
    ] {
        let put = app.put_user(id, json!({"email": "e@example.com"})).await;
        assert_eq!(put["user"]["id"], id);
        let got: Value = app
            .admin(Method::GET, &format!("/v1/users/{}", support::encode(id)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got["user"]["id"], id);
    }
}

async fn resolve_unknown_user_is_404(backend: Backend) {
    let Some((app, _s)) = app(backend, "resolve_unknown_user_is_404").await else {
        return;
    };
    let (status, body) = app.resolve("nobody").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("user_not_found"))
    );
    // The body form upserts first; with Stripe down that is a 503, but the user exists now.
    let response = app
        .admin(Method::POST, "/v1/users/somebody/customer")
        .json(&json!({"email": "somebody@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await, (503, "stripe_unavailable".into()));
    let got: Value = app
        .admin(Method::GET, "/v1/users/somebody")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["user"]["email"], "somebody@example.com");
}

async fn stripe_down_links_nothing(backend: Backend) {
    let Some((app, store)) = app(backend, "stripe_down_links_nothing").await else {
        return;
    };
    app.put_user(
        "u-down",
        json!({"email": "down@example.com", "email_verified": true}),
    )
    .await;
    let response = app
        .admin(Method::POST, "/v1/users/u-down/customer")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    assert_eq!(error_of(response).await, (503, "stripe_unavailable".into()));
    let got: Value = app
        .admin(Method::GET, "/v1/users/u-down")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["customer"], Value::Null);
    // The failed attempt left its claim free for the next one, which fails the same clean way.
    let id = billsync::domain::UserId::parse("u-down").unwrap();
    assert!(store
        .store
        .try_claim_resolve(&id, "probe", std::time::Duration::from_secs(1))
        .await
        .unwrap()
        .is_some());
}

async fn health_and_readiness(backend: Backend) {
    let Some((app, _s)) = app(backend, "health_and_readiness").await else {
        return;
    };
    let health: Value = app
        .http
        .get(app.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let response = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let ready: Value = response.json().await.unwrap();
    assert_eq!(ready["database"], app.state.store.backend());

    // A request id given by the caller comes back.
    let response = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "trace-me-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-123");
}

on_every_store!(
    admin_routes_need_the_key,
    admin_routes_are_off_without_a_key,
    users_are_created_read_and_replaced,
    bad_input_gets_clear_errors,
    hostile_user_ids_round_trip,
    resolve_unknown_user_is_404,
    stripe_down_links_nothing,
    health_and_readiness,
);

#[tokio::test]
async fn readiness_fails_when_the_database_is_gone() {
    // A Postgres URL nobody listens on: the process is up, not ready.
    let store = billsync::store::connect("postgres://postgres@127.0.0.1:9/none", 1)
        .await
        .unwrap();
    let app = TestApp::spawn(store, &support::test_config(DEAD_STRIPE)).await;
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let response = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(
        error_of(response).await,
        (503, "database_unavailable".into())
    );
    let response = app.admin(Method::GET, "/v1/users/u1").send().await.unwrap();
    assert_eq!(
        error_of(response).await,
        (503, "database_unavailable".into())
    );
}
