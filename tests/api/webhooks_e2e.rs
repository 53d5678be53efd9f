//! Webhooks end to end: localstripe sends real signed events to billsync's endpoint.

use crate::support;

use reqwest::Method;
use serde_json::{json, Value};
use support::{eventually, Backend, LocalStripe, Registration, TestApp};

async fn user(app: &TestApp, id: &str) -> Value {
    app.admin(Method::GET, &format!("/v1/users/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn stripe_side_changes_reach_the_user(backend: Backend) {
    let test = "stripe_side_changes_reach_the_user";
    let Some(base) = support::localstripe_url(test) else {
        return;
    };
    let Some(store) = backend.store(test).await else {
        return;
    };
    let app = TestApp::spawn(store.store.clone(), &support::test_config(&base)).await;
    let hook = Registration::new(&base, &app).await;
    let stripe = LocalStripe::new(&base);
    let http = reqwest::Client::new();

    let id = support::unique("hooked");
    let email = format!("{id}@example.com");
    app.put_user(
        &id,
        json!({"email": email, "first_name": "Ada", "last_name": "Lovelace"}),
    )
    .await;
    let (_, resolved) = app.resolve(&id).await;
    let customer = resolved["customer_id"].as_str().unwrap().to_owned();

    // A change made in Stripe (as the billing portal would) reaches the user row.
    let changed = http
        .post(format!("{base}/v1/customers/{customer}"))
        .basic_auth(support::STRIPE_KEY, Some(""))
        .form(&[("name", "Grace Hopper"), ("phone", "+14155550177")])
        .send()
        .await
        .unwrap();
    assert!(changed.status().is_success());
    let updated = eventually(20, "the portal change in the user row", || async {
        let u = user(&app, &id).await;
        (u["user"]["first_name"] == "Grace").then_some(u)
    })
    .await;
    assert_eq!(updated["user"]["last_name"], "Hopper");
    assert_eq!(updated["user"]["phone"], "+14155550177");

    // billsync's own push comes back as customer.updated and writes nothing.
    let token = support::user_token(&id, Some(&email), None);
    let response = app
        .as_user(Method::PUT, "/api/user/profile", &token)
        .json(&json!({"firstName": "Local"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    eventually(20, "the push in Stripe", || async {
        (stripe.customer(&customer).await["name"] == "Local Hopper").then_some(())
    })
    .await;
    let version = user(&app, &id).await["user"]["version"].clone();
    // localstripe delivers about a second later; give the echo time to arrive and be applied.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    eventually(20, "the echo applied", || async {
        let pending: Value = app
            .admin(Method::GET, "/v1/events?state=pending")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pending["events"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    let after = user(&app, &id).await;
    assert_eq!(
        after["user"]["version"], version,
        "the echo bumped no version"
    );
    assert_eq!(after["user"]["first_name"], "Local");

    // Deleting the customer in Stripe unlinks the user, who keeps their account.
    let deleted = http
        .delete(format!("{base}/v1/customers/{customer}"))
        .basic_auth(support::STRIPE_KEY, Some(""))
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    eventually(20, "the unlink", || async {
        let u = user(&app, &id).await;
        (u["customer"].is_null()).then_some(())
    })
    .await;
    assert_eq!(user(&app, &id).await["user"]["email"], email.as_str());
    hook.mute().await;
}

on_every_store!(stripe_side_changes_reach_the_user);
