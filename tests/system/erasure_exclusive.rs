//! Erasure is exclusive per user (issue 12 §5): no profile push reaches Stripe after the
//! scrub started, and a customer linked after the saga's plan is erased too.

use crate::support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use billsync::{
    domain::UserId,
    gdpr,
    store::{JobState, Store},
    stripe::StripeClient,
};
use reqwest::Method;
use serde_json::json;
use support::{eventually, Backend, LocalStripe, TestApp};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// What a customer update was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Update {
    Push,
    Scrub,
}

/// A Stripe whose first profile push answers 500 after 1.5 s (so the client retries it while
/// the erasure runs); everything else answers at once.
#[derive(Clone, Default)]
struct SlowStripe {
    updates: Arc<Mutex<Vec<Update>>>,
    /// The scrub's form fields.
    scrub: Arc<Mutex<Vec<(String, String)>>>,
}

impl Respond for SlowStripe {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if request.method.as_str() == "GET" {
            return ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "data": [], "has_more": false}));
        }
        let form: Vec<(String, String)> =
            serde_urlencoded::from_bytes(&request.body).unwrap_or_default();
        let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let update = if field("metadata[userId]").is_some_and(|v| v.starts_with("erased:")) {
            self.scrub.lock().unwrap().clone_from(&form);
            Update::Scrub
        } else {
            assert_eq!(field("metadata[synced_from]").as_deref(), Some("billsync"));
            Update::Push
        };
        let first_push = {
            let mut updates = self.updates.lock().unwrap();
            updates.push(update);
            update == Update::Push && updates.iter().filter(|u| **u == Update::Push).count() == 1
        };
        if first_push {
            return ResponseTemplate::new(500)
                .set_body_json(json!({"error": {"type": "api_error", "message": "slow"}}))
                .set_delay(Duration::from_millis(1500));
        }
        ResponseTemplate::new(200).set_body_json(json!({
            "id": "cus_slow", "object": "customer", "email": "racer@example.com",
            "metadata": {}}))
    }
}

async fn an_erasure_waits_for_an_in_flight_push(backend: Backend) {
    let Some(store) = backend
        .store("an_erasure_waits_for_an_in_flight_push")
        .await
    else {
        return;
    };
    let stripe = MockServer::start().await;
    let fake = SlowStripe::default();
    Mock::given(wiremock::matchers::any())
        .respond_with(fake.clone())
        .mount(&stripe)
        .await;
    let app = TestApp::spawn(store.store.clone(), &support::test_config(&stripe.uri())).await;
    support::seed_linked_user(app.state.store.as_ref(), "racer", "cus_slow").await;
    app.put_user(
        "racer",
        json!({"email": "racer@example.com", "first_name": "Ada", "phone": "+14155550123"}),
    )
    .await;
    eventually(10, "the push is in flight at Stripe", || async {
        fake.updates
            .lock()
            .unwrap()
            .contains(&Update::Push)
            .then_some(())
    })
    .await;

    let token = support::user_token("racer", Some("racer@example.com"), Some(json!(true)));
    let response = app
        .as_user(Method::DELETE, "/api/user/delete-account", &token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    assert!(status == 200 || status == 202, "{status}");
    let user = UserId::parse("racer").unwrap();
    eventually(20, "the erasure is done", || async {
        let store = app.state.store.clone();
        (store.get_user(&user).await.unwrap().is_none()
            && store.active_erase(&user).await.unwrap().is_none())
        .then_some(())
    })
    .await;
    // Let any straggling push land: its job ends once its client gave up or got through.
    eventually(20, "no job in flight", || async {
        app.state
            .store
            .list_jobs(Some(JobState::InFlight), 10)
            .await
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let updates = fake.updates.lock().unwrap().clone();
    let scrub = updates
        .iter()
        .position(|u| *u == Update::Scrub)
        .expect("a scrub");
    assert!(
        updates[scrub..].iter().all(|u| *u == Update::Scrub),
        "a push reached Stripe after the scrub: {updates:?}"
    );
    assert_eq!(updates[0], Update::Push, "{updates:?}");
    // The kept customer is emptied of everything personal (an empty value unsets a field).
    let scrub = fake.scrub.lock().unwrap().clone();
    for name in [
        "email",
        "name",
        "phone",
        "description",
        "address",
        "shipping",
    ] {
        assert!(
            scrub.iter().any(|(k, v)| k == name && v.is_empty()),
            "{name} not cleared: {scrub:?}"
        );
    }
}

/// A resolve links a customer after the erasure planned (with no customer): the deleting
/// transaction finds it, and the saga scrubs it before the rows go.
async fn a_customer_linked_after_the_plan_is_scrubbed_too(backend: Backend) {
    let Some(base) = support::localstripe_url("a_customer_linked_after_the_plan") else {
        return;
    };
    let Some(t) = backend.store("a_customer_linked_after_the_plan").await else {
        return;
    };
    let local = LocalStripe::new(&base);
    let user = support::unique("late-link");
    let email = format!("{user}@example.com");
    let customer = local
        .create_customer(&[
            ("email", &email),
            ("name", "Ada Lovelace"),
            ("phone", "+14155550123"),
            ("description", "Ada's account"),
            ("address[line1]", "12 St James's Square"),
        ])
        .await;
    let customer_id = customer["id"].as_str().unwrap().to_owned();
    let store: &dyn Store = t.store.as_ref();
    let user_id = UserId::parse(&user).unwrap();
    store
        .upsert_user(&billsync::store::UserUpsert {
            id: user_id.clone(),
            email: billsync::domain::Email::parse(&email).unwrap(),
            email_verified: true,
            first_name: None,
            last_name: None,
            phone: None,
        })
        .await
        .unwrap();
    // The plan: no customer yet.
    let plan = serde_json::to_value(gdpr::ErasurePlan::default()).unwrap();
    let job = store.enqueue_erase(&user_id, &plan).await.unwrap();
    // Then the link.
    support::link_in_store(store, &user, &customer_id).await;

    let config = support::test_config(&base);
    let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap()).unwrap();
    let claimed = store
        .claim_job(job.id, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    gdpr::run_erasure(store, &stripe, &gdpr::Tombstones::new(None), &claimed)
        .await
        .expect("erasure");
    assert_eq!(store.get_user(&user_id).await.unwrap(), None);
    let after = local.customer(&customer_id).await;
    assert!(
        after["name"].as_str().unwrap_or_default().is_empty(),
        "{after}"
    );
    assert!(
        after["phone"].as_str().unwrap_or_default().is_empty(),
        "{after}"
    );
    for field in ["email", "description", "address"] {
        assert!(
            after[field].is_null() || after[field] == "",
            "{field} kept: {after}"
        );
    }
    assert!(
        after["metadata"]["userId"]
            .as_str()
            .is_some_and(|v| v.starts_with("erased:")),
        "{after}"
    );
}

on_every_store!(
    an_erasure_waits_for_an_in_flight_push,
    a_customer_linked_after_the_plan_is_scrubbed_too,
);
