//! The webhook route through a real server: verification, durable and idempotent ingestion,
//! and its errors. Needs no Stripe.

use crate::support;

use reqwest::Method;
use serde_json::{json, Value};
use support::{Backend, TestApp};

async fn app(backend: Backend, test: &str) -> Option<(TestApp, support::TestStore)> {
    let store = backend.store(test).await?;
    let app = TestApp::spawn(
        store.store.clone(),
        &support::test_config("http://127.0.0.1:9"),
    )
    .await;
    Some((app, store))
}

fn event(id: &str, kind: &str, customer: &str) -> String {
    json!({
        "id": id, "object": "event", "type": kind, "created": 1_700_000_000, "livemode": false,
        "api_version": "2017-08-15",
        "data": {"object": {"id": customer, "object": "customer", "email": "x@example.com"}}
    })
    .to_string()
}

async fn deliver(app: &TestApp, body: &str, signature: Option<&str>) -> (u16, Value) {
    let mut request = app
        .http
        .post(app.url("/api/webhooks/stripe"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn stored(app: &TestApp, state: Option<&str>) -> Vec<Value> {
    let path = match state {
        Some(state) => format!("/v1/events?state={state}&limit=1000"),
        None => "/v1/events?limit=1000".to_owned(),
    };
    let body: Value = app
        .admin(Method::GET, &path)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["events"].as_array().unwrap().clone()
}

async fn a_signed_event_is_stored_once(backend: Backend) {
    let Some((app, _s)) = app(backend, "a_signed_event_is_stored_once").await else {
        return;
    };
    let body = event("evt_once", "customer.updated", "cus_once");
    let signature = support::stripe_signature(support::WEBHOOK_SECRET, &body);
    assert_eq!(
        deliver(&app, &body, Some(&signature)).await,
        (200, json!({"received": true}))
    );
    // Redelivered: acknowledged, nothing changes.
    assert_eq!(deliver(&app, &body, Some(&signature)).await.0, 200);
    let events = stored(&app, None).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["id"], "evt_once");
    assert_eq!(events[0]["type"], "customer.updated");
    assert_eq!(events[0]["customer_id"], "cus_once");
    // Stored for the applier, which may already have run (the customer is nobody's: a no-op).
    assert!(
        events[0]["state"] == "pending" || events[0]["state"] == "applied",
        "{}",
        events[0]
    );

    // Unknown types are acknowledged and kept as skipped.
    let other = event("evt_other", "invoice.paid", "cus_once");
    let signature = support::stripe_signature(support::WEBHOOK_SECRET, &other);
    assert_eq!(deliver(&app, &other, Some(&signature)).await.0, 200);
    assert_eq!(stored(&app, Some("skipped")).await[0]["id"], "evt_other");
}

async fn rejected_requests_store_nothing(backend: Backend) {
    let Some((app, _s)) = app(backend, "rejected_requests_store_nothing").await else {
        return;
    };
    let body = event("evt_bad", "customer.updated", "cus_bad");
    let good = support::stripe_signature(support::WEBHOOK_SECRET, &body);
    let t = time::OffsetDateTime::now_utc().unix_timestamp();
    let stale_t = t - 301;
    let stale = format!(
        "t={stale_t},v1={}",
        hex::encode(billsync::webhooks::signature::sign(
            support::WEBHOOK_SECRET,
            stale_t,
            body.as_bytes()
        ))
    );
    let cases = [
        (body.clone(), None, "missing_signature"),
        (
            body.clone(),
            Some("v1=abc".to_owned()),
            "invalid_signature_header",
        ),
        (
            body.clone(),
            Some(format!("t={t}")),
            "invalid_signature_header",
        ),
        (
            body.clone(),
            Some(format!("t={t},v1={}", "0".repeat(64))),
            "invalid_signature",
        ),
        (
            body.clone(),
            Some(support::stripe_signature("whsec_someone_else", &body)),
            "invalid_signature",
        ),
        (
            body.replace("cus_bad", "cus_evil"),
            Some(good.clone()),
            "invalid_signature",
        ),
        (body.clone(), Some(stale), "timestamp_out_of_tolerance"),
    ];
    for (payload, signature, code) in cases {
        let (status, answer) = deliver(&app, &payload, signature.as_deref()).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some(code)),
            "{signature:?}"
        );
    }
    let junk = "{\"not\": \"an event\"}";
    let (status, answer) = deliver(
        &app,
        junk,
        Some(&support::stripe_signature(support::WEBHOOK_SECRET, junk)),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_payload"))
    );
    let not_json = "garbage";
    let (status, answer) = deliver(
        &app,
        not_json,
        Some(&support::stripe_signature(
            support::WEBHOOK_SECRET,
            not_json,
        )),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_payload"))
    );

    let huge = format!("{{\"pad\": \"{}\"}}", "x".repeat(1024 * 1024));
    let (status, answer) = deliver(
        &app,
        &huge,
        Some(&support::stripe_signature(support::WEBHOOK_SECRET, &huge)),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    assert!(
        stored(&app, None).await.is_empty(),
        "nothing stored for a rejected request"
    );
}

async fn secrets_rotate(backend: Backend) {
    let Some(store) = backend.store("secrets_rotate").await else {
        return;
    };
    let mut config = support::test_config("http://127.0.0.1:9");
    config.webhooks.secrets = vec![
        billsync::config::Secret::new("whsec_new_secret"),
        billsync::config::Secret::new(support::WEBHOOK_SECRET),
    ];
    let app = TestApp::spawn(store.store.clone(), &config).await;
    for (id, secret) in [
        ("evt_old", support::WEBHOOK_SECRET),
        ("evt_new", "whsec_new_secret"),
    ] {
        let body = event(id, "customer.updated", "cus_rot");
        assert_eq!(
            deliver(&app, &body, Some(&support::stripe_signature(secret, &body)))
                .await
                .0,
            200
        );
    }
    // Both signatures in one header (Stripe sends one per active secret during a rotation).
    let body = event("evt_both", "customer.updated", "cus_rot");
    let t = time::OffsetDateTime::now_utc().unix_timestamp();
    let sign = |s: &str| hex::encode(billsync::webhooks::signature::sign(s, t, body.as_bytes()));
    let header = format!(
        "t={t},v1={},v1={}",
        sign("whsec_retired"),
        sign("whsec_new_secret")
    );
    assert_eq!(deliver(&app, &body, Some(&header)).await.0, 200);
    assert_eq!(stored(&app, None).await.len(), 3);
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<u16>>) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(tasks.len());
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    statuses
}

async fn concurrent_deliveries_are_group_committed(backend: Backend) {
    let Some((app, _s)) = app(backend, "concurrent_deliveries_are_group_committed").await else {
        return;
    };
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            // 150 distinct events, each delivered twice, all at once.
            let body = event(
                &format!("evt_c{}", i % 150),
                "customer.updated",
                &format!("cus_c{}", i % 7),
            );
            let signature = support::stripe_signature(support::WEBHOOK_SECRET, &body);
            let request = app
                .http
                .post(app.url("/api/webhooks/stripe"))
                .header("stripe-signature", signature)
                .body(body);
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let statuses: Vec<u16> = futures_join(tasks).await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every delivery acknowledged: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let events = stored(&app, None).await;
    assert_eq!(events.len(), 150, "each event stored exactly once");
}

async fn events_can_be_replayed(backend: Backend) {
    let Some((app, _s)) = app(backend, "events_can_be_replayed").await else {
        return;
    };
    let body = event("evt_replay", "customer.deleted", "cus_r");
    deliver(
        &app,
        &body,
        Some(&support::stripe_signature(support::WEBHOOK_SECRET, &body)),
    )
    .await;
    let replayed = app
        .admin(Method::POST, "/v1/events/evt_replay/replay")
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 200);
    let answer: Value = replayed.json().await.unwrap();
    assert_eq!(answer["event"]["state"], "pending");
    assert_eq!(answer["event"]["attempts"], 0);
    let missing = app
        .admin(Method::POST, "/v1/events/evt_nope/replay")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let bad = app
        .admin(Method::GET, "/v1/events?state=lost")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
}

/// Under Connect, a connected account's customer events reach the platform's endpoint too:
/// they are acknowledged and kept as skipped, never applied to the platform's users. Events
/// of another API version are applied, and counted by version.
async fn connect_events_are_skipped_and_versions_counted(backend: Backend) {
    let Some((app, _s)) = app(backend, "connect_events_are_skipped_and_versions_counted").await
    else {
        return;
    };
    support::seed_linked_user(app.state.store.as_ref(), "platform-user", "cus_connect").await;
    let mut connect: Value =
        serde_json::from_str(&event("evt_connect", "customer.updated", "cus_connect")).unwrap();
    connect["account"] = json!("acct_1Connected");
    connect["data"]["object"]["email"] = json!("someone-else@example.com");
    let body = connect.to_string();
    let signature = support::stripe_signature(support::WEBHOOK_SECRET, &body);
    assert_eq!(deliver(&app, &body, Some(&signature)).await.0, 200);
    let skipped = stored(&app, Some("skipped")).await;
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0]["id"], "evt_connect");
    let user = app
        .state
        .store
        .get_user(&billsync::domain::UserId::parse("platform-user").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        user.email.as_str(),
        "platform-user@example.com",
        "not applied"
    );

    // The platform's own event, rendered in an older version: applied, and counted.
    let own = event("evt_own", "customer.updated", "cus_connect");
    let signature = support::stripe_signature(support::WEBHOOK_SECRET, &own);
    assert_eq!(deliver(&app, &own, Some(&signature)).await.0, 200);
    let metrics = app
        .admin(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("billsync_webhook_connect_events_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"billsync_webhook_api_version_mismatches_total{version="2017-08-15"}"#),
        "{metrics}"
    );
}

on_every_store!(
    connect_events_are_skipped_and_versions_counted,
    a_signed_event_is_stored_once,
    rejected_requests_store_nothing,
    secrets_rotate,
    concurrent_deliveries_are_group_committed,
    events_can_be_replayed,
);

#[tokio::test]
async fn the_database_down_is_503_never_2xx() {
    let store = billsync::store::connect("postgres://postgres@127.0.0.1:9/none", 2)
        .await
        .unwrap();
    let app = TestApp::spawn(store, &support::test_config("http://127.0.0.1:9")).await;
    let body = event("evt_down", "customer.updated", "cus_down");
    let (status, answer) = deliver(
        &app,
        &body,
        Some(&support::stripe_signature(support::WEBHOOK_SECRET, &body)),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (503, Some("database_unavailable"))
    );
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "readyz says so");
}

#[tokio::test]
async fn webhooks_are_off_without_a_secret() {
    let store = support::sqlite_store().await;
    let mut config = support::test_config("http://127.0.0.1:9");
    config.webhooks.secrets.clear();
    let app = TestApp::spawn(store.store.clone(), &config).await;
    let body = event("evt_off", "customer.updated", "cus_off");
    let (status, answer) = deliver(
        &app,
        &body,
        Some(&support::stripe_signature(support::WEBHOOK_SECRET, &body)),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (503, Some("webhooks_disabled"))
    );
}
