//! `POST /v1/users/batch`: up to 1,000 users in one request, a result per row in order, each
//! row checked and written as `PUT /v1/users/{user_id}` does; and the user whose id is
//! `batch` still reachable at `/v1/users/batch`.

use crate::support;

use billsync::domain::UserId;
use reqwest::Method;
use serde_json::{json, Value};
use support::{Backend, TestApp};

async fn app(backend: Backend, test: &str) -> Option<(TestApp, support::TestStore)> {
    let store = backend.store(test).await?;
    let config = support::test_config("http://127.0.0.1:9");
    Some((TestApp::spawn(store.store.clone(), &config).await, store))
}

async fn batch(app: &TestApp, body: Value) -> (u16, Value) {
    support::status_and_json(app.admin(Method::POST, "/v1/users/batch").json(&body)).await
}

/// Each result as (id, status, error code).
fn results(body: &Value) -> Vec<(Value, String, Option<String>)> {
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].clone(),
                r["status"].as_str().unwrap().to_owned(),
                r["error"]["code"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

async fn a_batch_answers_each_row_in_order(backend: Backend) {
    let Some((app, t)) = app(backend, "a_batch_answers_each_row_in_order").await else {
        return;
    };
    app.put_user("known", json!({"email": "known@example.com"}))
        .await;
    app.put_user(
        "same",
        json!({"email": "same@example.com", "first_name": "Sam"}),
    )
    .await;
    // An erased person, with no account since.
    let gone = UserId::parse("gone").unwrap();
    app.state
        .worker
        .tombstones()
        .record(t.store.as_ref(), &gone)
        .await
        .unwrap();

    let (status, body) = batch(
        &app,
        json!({"users": [
            {"id": "new", "email": "New@Example.com", "email_verified": true},
            {"id": "bad-email", "email": "private-person-at-nowhere"},
            {"id": "known", "email": "known@example.com", "last_name": "Known"},
            {"id": "no-email"},
            "not an object",
            {"id": "same", "email": "same@example.com", "first_name": "Sam"},
            {"id": "gone", "email": "gone@example.com"},
            {"id": "bad-phone", "email": "p@example.com", "phone": "12"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        results(&body),
        [
            (json!("new"), "created".into(), None),
            (
                json!("bad-email"),
                "invalid".into(),
                Some("invalid_email".into())
            ),
            (json!("known"), "updated".into(), None),
            (
                json!("no-email"),
                "invalid".into(),
                Some("invalid_request".into())
            ),
            (
                Value::Null,
                "invalid".into(),
                Some("invalid_request".into())
            ),
            (json!("same"), "unchanged".into(), None),
            (json!("gone"), "erased".into(), None),
            (
                json!("bad-phone"),
                "invalid".into(),
                Some("invalid_phone".into())
            ),
        ]
    );
    assert_eq!(
        body["summary"],
        json!({"created": 1, "updated": 1, "unchanged": 1, "erased": 1, "invalid": 4})
    );
    assert!(
        !body.to_string().contains("private-person"),
        "a row's values are never echoed in its error"
    );
    let new = &body["results"][0]["user"];
    assert_eq!(
        (new["email"].clone(), new["version"].clone()),
        (json!("new@example.com"), json!(1))
    );
    assert_eq!(body["results"][2]["user"]["last_name"], "Known");
    assert_eq!(body["results"][2]["user"]["version"], 2);
    assert!(body["results"][6].get("user").is_none());

    // As the PUT left them.
    let known = app
        .admin(Method::GET, "/v1/users/known")
        .send()
        .await
        .unwrap();
    let known: Value = known.json().await.unwrap();
    assert_eq!(known["user"]["last_name"], "Known");
    let gone = app
        .admin(Method::GET, "/v1/users/gone")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);

    // The same rows again change nothing.
    let (_, again) = batch(
        &app,
        json!({"users": [
            {"id": "new", "email": "New@Example.com", "email_verified": true},
            {"id": "known", "email": "known@example.com", "last_name": "Known"},
        ]}),
    )
    .await;
    assert_eq!(again["summary"]["unchanged"], 2);
    assert_eq!(again["summary"]["created"], 0);
}

async fn a_batch_of_a_thousand_is_taken_and_more_is_refused(backend: Backend) {
    let Some((app, _t)) = app(backend, "a_batch_of_a_thousand_is_taken").await else {
        return;
    };
    let rows = |n: usize| {
        (0..n)
            .map(|i| json!({"id": format!("bulk-{i:04}"), "email": format!("bulk{i}@example.com")}))
            .collect::<Vec<_>>()
    };
    let (status, body) = batch(&app, json!({"users": rows(1001)})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (422, &json!("invalid_request"))
    );
    let nobody = app
        .admin(Method::GET, "/v1/users/bulk-0000")
        .send()
        .await
        .unwrap();
    assert_eq!(nobody.status(), 404, "a refused batch writes nothing");

    let (status, body) = batch(&app, json!({"users": rows(1000)})).await;
    assert_eq!(status, 200);
    assert_eq!(body["summary"]["created"], 1000);
    assert_eq!(body["results"][999]["id"], "bulk-0999");

    let (status, body) = batch(&app, json!({"users": {"id": "x"}})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (422, &json!("invalid_request"))
    );
    let (status, body) = batch(&app, json!({"users": [], "dry_run": true})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (422, &json!("invalid_request"))
    );
    let (status, body) = batch(&app, json!({"users": []})).await;
    assert_eq!((status, body["results"].clone()), (200, json!([])));
    let unauthorised = app
        .http
        .post(app.url("/v1/users/batch"))
        .json(&json!({"users": rows(1)}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorised.status(), 401);
}

async fn the_user_named_batch_keeps_their_routes(backend: Backend) {
    let Some((app, _t)) = app(backend, "the_user_named_batch_keeps_their_routes").await else {
        return;
    };
    let missing = app
        .admin(Method::GET, "/v1/users/batch")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let put = app
        .put_user("batch", json!({"email": "batch@example.com"}))
        .await;
    assert_eq!(put["user"]["id"], "batch");
    let got = app
        .admin(Method::GET, "/v1/users/batch")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let got: Value = got.json().await.unwrap();
    assert_eq!(got["user"]["email"], "batch@example.com");
    let billing = app
        .admin(Method::GET, "/v1/users/batch/billing")
        .send()
        .await
        .unwrap();
    assert_eq!(billing.status(), 200);
    let deleted = app
        .admin(Method::DELETE, "/v1/users/batch")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 405);
}

on_every_store!(
    a_batch_answers_each_row_in_order,
    a_batch_of_a_thousand_is_taken_and_more_is_refused,
    the_user_named_batch_keeps_their_routes,
);
