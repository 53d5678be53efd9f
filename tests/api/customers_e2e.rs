//! Customer resolution end to end: a real billsync server, a real store (SQLite and Postgres)
//! and localstripe as Stripe. Skipped, out loud, without `BILLSYNC_TEST_LOCALSTRIPE_URL`.

use crate::support;

use std::collections::HashSet;

use serde_json::{json, Value};
use support::{Backend, LocalStripe, TestApp};

struct World {
    app: TestApp,
    stripe: LocalStripe,
    _store: support::TestStore,
}

async fn world(backend: Backend, test: &str) -> Option<World> {
    let base = support::localstripe_url(test)?;
    let store = backend.store(test).await?;
    let _ = support::captured_logs();
    let app = TestApp::spawn(store.store.clone(), &support::test_config(&base)).await;
    Some(World {
        app,
        stripe: LocalStripe::new(&base),
        _store: store,
    })
}

fn email_for(user: &str) -> String {
    format!("{user}@example.com")
}

async fn new_user_gets_a_customer_with_email_name_and_metadata(backend: Backend) {
    let test = "new_user_gets_a_customer_with_email_name_and_metadata";
    let Some(w) = world(backend, test).await else {
        return;
    };
    let user = support::unique("new");
    w.app
        .put_user(
            &user,
            json!({"email": email_for(&user).to_uppercase(), "first_name": " Ada ", "last_name": "Lovelace"}),
        )
        .await;
    let (status, body) = w.app.resolve(&user).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "created");
    let id = body["customer_id"].as_str().unwrap();
    assert!(id.starts_with("cus_"));

    let customer = w.stripe.customer(id).await;
    assert_eq!(
        customer["email"],
        email_for(&user),
        "email is sent normalised"
    );
    assert_eq!(customer["name"], "Ada Lovelace");
    assert_eq!(customer["metadata"]["userId"], user.as_str());
    assert_eq!(customer["metadata"]["source"], "billsync");
    let created_at = customer["metadata"]["created_at"].as_str().unwrap();
    assert!(
        time::OffsetDateTime::parse(created_at, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "{created_at}"
    );

    let got: Value = w
        .app
        .admin(reqwest::Method::GET, &format!("/v1/users/{user}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["customer"]["id"], id);
    assert_eq!(got["customer"]["linked_via"], "created");
    assert!(got["customer"]["linked_at"].is_string());
}

async fn a_nameless_user_gets_no_name(backend: Backend) {
    let Some(w) = world(backend, "a_nameless_user_gets_no_name").await else {
        return;
    };
    let user = support::unique("nameless");
    w.app
        .put_user(&user, json!({"email": email_for(&user)}))
        .await;
    let (_, body) = w.app.resolve(&user).await;
    let customer = w
        .stripe
        .customer(body["customer_id"].as_str().unwrap())
        .await;
    assert_eq!(customer["name"], Value::Null);
}

async fn second_resolve_is_existing_without_calling_stripe(backend: Backend) {
    let test = "second_resolve_is_existing_without_calling_stripe";
    let Some(w) = world(backend, test).await else {
        return;
    };
    let user = support::unique("twice");
    w.app
        .put_user(&user, json!({"email": email_for(&user)}))
        .await;
    let (_, first) = w.app.resolve(&user).await;
    assert_eq!(first["source"], "created");
    let calls_before = w.app.state.stripe.attempts_sent();
    let (status, second) = w.app.resolve(&user).await;
    assert_eq!(status, 200);
    assert_eq!(second["source"], "existing");
    assert_eq!(second["customer_id"], first["customer_id"]);
    assert_eq!(
        w.app.state.stripe.attempts_sent(),
        calls_before,
        "no Stripe call"
    );
    assert_eq!(
        w.stripe.customers_with_email(&email_for(&user)).await.len(),
        1
    );
}

async fn a_customer_carrying_the_user_id_is_adopted(backend: Backend) {
    let test = "a_customer_carrying_the_user_id_is_adopted";
    let Some(w) = world(backend, test).await else {
        return;
    };
    let user = support::unique("crashed");
    let email = email_for(&user);
    // Left behind by an attempt that created the customer and crashed before linking it.
    let orphan = w
        .stripe
        .create_customer(&[("email", &email), ("metadata[userId]", &user)])
        .await;
    // Unverified email: metadata, not email, is what links here.
    w.app.put_user(&user, json!({"email": email})).await;
    let (status, body) = w.app.resolve(&user).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "stripe_metadata");
    assert_eq!(body["customer_id"], orphan["id"]);
    assert_eq!(
        w.stripe.customers_with_email(&email).await.len(),
        1,
        "no new customer"
    );
}

async fn a_verified_unique_email_match_is_linked(backend: Backend) {
    let test = "a_verified_unique_email_match_is_linked";
    let Some(w) = world(backend, test).await else {
        return;
    };
    let user = support::unique("verified");
    let email = email_for(&user);
    let existing = w
        .stripe
        .create_customer(&[("email", &email), ("name", "Pre Existing")])
        .await;
    w.app
        .put_user(&user, json!({"email": email, "email_verified": true}))
        .await;
    let (status, body) = w.app.resolve(&user).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "stripe_email");
    assert_eq!(body["customer_id"], existing["id"]);
    assert_eq!(w.stripe.customers_with_email(&email).await.len(), 1);
}

async fn an_unverified_email_match_is_not_linked(backend: Backend) {
    let test = "an_unverified_email_match_is_not_linked";
    let Some(w) = world(backend, test).await else {
        return;
    };
    let user = support::unique("unverified");
    let email = email_for(&user);
    let candidate = w.stripe.create_customer(&[("email", &email)]).await;
    let candidate_id = candidate["id"].as_str().unwrap();
    w.app
        .put_user(&user, json!({"email": email, "email_verified": false}))
        .await;
    let (status, body) = w.app.resolve(&user).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "created");
    assert_ne!(body["customer_id"], candidate["id"]);
    assert_eq!(w.stripe.customers_with_email(&email).await.len(), 2);
    let logs = support::logs_text();
    let line = logs
        .lines()
        .find(|l| l.contains(candidate_id))
        .unwrap_or_else(|| panic!("candidate {candidate_id} not in the logs"));
    assert!(
        line.contains("possible duplicate customer") && line.contains("email not verified"),
        "{line}"
    );
}

async fn two_email_matches_are_not_linked(backend: Backend) {
    let Some(w) = world(backend, "two_email_matches_are_not_linked").await else {
        return;
    };
    let user = support::unique("ambiguous");
    let email = email_for(&user);
    let a = w.stripe.create_customer(&[("email", &email)]).await;
    let b = w.stripe.create_customer(&[("email", &email)]).await;
    w.app
        .put_user(&user, json!({"email": email, "email_verified": true}))
        .await;
    let (status, body) = w.app.resolve(&user).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "created");
    assert_ne!(body["customer_id"], a["id"]);
    assert_ne!(body["customer_id"], b["id"]);
    assert_eq!(w.stripe.customers_with_email(&email).await.len(), 3);
    let logs = support::logs_text();
    let line = logs
        .lines()
        .find(|l| l.contains(a["id"].as_str().unwrap()) && l.contains(b["id"].as_str().unwrap()))
        .expect("both candidates logged on one line");
    assert!(
        line.contains("several customers share this email"),
        "{line}"
    );
}

async fn another_users_customer_is_never_taken_by_email(backend: Backend) {
    let test = "another_users_customer_is_never_taken_by_email";
    let Some(w) = world(backend, test).await else {
        return;
    };
    let (owner, intruder) = (support::unique("owner"), support::unique("intruder"));
    let email = email_for(&owner);
    // The owner's customer, created through billsync.
    w.app
        .put_user(&owner, json!({"email": email, "email_verified": true}))
        .await;
    let (_, owned) = w.app.resolve(&owner).await;
    // Someone else signs up with the same (verified) address: they must not get the owner's
    // billing portal.
    w.app
        .put_user(&intruder, json!({"email": email, "email_verified": true}))
        .await;
    let (status, body) = w.app.resolve(&intruder).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "created");
    assert_ne!(body["customer_id"], owned["customer_id"]);

    // A customer without metadata that billsync already linked to one user is not linked to a
    // second one either.
    let (first, second) = (support::unique("first"), support::unique("second"));
    let shared = email_for(&first);
    let plain = w.stripe.create_customer(&[("email", &shared)]).await;
    w.app
        .put_user(&first, json!({"email": shared, "email_verified": true}))
        .await;
    let (_, linked) = w.app.resolve(&first).await;
    assert_eq!(linked["customer_id"], plain["id"]);
    w.app
        .put_user(&second, json!({"email": shared, "email_verified": true}))
        .await;
    let (_, other) = w.app.resolve(&second).await;
    assert_ne!(other["customer_id"], plain["id"]);
}

/// Sends `count` resolves for `user` at once, each from its own task, to each app in turn.
async fn race(apps: &[&TestApp], user: &str, count: usize) -> Vec<(u16, Value)> {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let app = apps[i % apps.len()];
            let request = app.admin(
                reqwest::Method::POST,
                &format!("/v1/users/{}/customer", support::encode(user)),
            );
            tokio::spawn(support::status_and_json(request))
        })
        .collect();
    let mut answers = Vec::with_capacity(count);
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    answers
}

/// All answers are 200 with one customer id, exactly one of them `created`, and Stripe holds
/// exactly that one customer for the email.
async fn assert_one_customer(stripe: &LocalStripe, email: &str, answers: &[(u16, Value)]) {
    let ids: HashSet<&str> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body}");
            body["customer_id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(ids.len(), 1, "all answers carry one id: {ids:?}");
    let created = answers
        .iter()
        .filter(|(_, b)| b["source"] == "created")
        .count();
    assert_eq!(created, 1);
    let in_stripe = stripe.customers_with_email(email).await;
    assert_eq!(in_stripe.len(), 1, "exactly one customer in Stripe");
    assert_eq!(in_stripe[0]["id"].as_str(), ids.iter().next().copied());
}

async fn fifty_concurrent_resolves_make_one_customer(backend: Backend) {
    let test = "fifty_concurrent_resolves_make_one_customer";
    let Some(w) = world(backend, test).await else {
        return;
    };
    let user = support::unique("racer");
    let email = email_for(&user);
    w.app
        .put_user(&user, json!({"email": email, "first_name": "Race"}))
        .await;
    let answers = race(&[&w.app], &user, 50).await;
    assert_eq!(answers.len(), 50);
    assert_one_customer(&w.stripe, &email, &answers).await;
}

/// Two instances share nothing but the database: only the claim row keeps them apart.
async fn two_instances_race_for_one_customer(backend: Backend) {
    let test = "two_instances_race_for_one_customer";
    let Some(w) = world(backend, test).await else {
        return;
    };
    let second_store = billsync::store::connect(&w._store.url, 8).await.unwrap();
    let second = TestApp::spawn(second_store, &support::test_config(&w.stripe.base)).await;
    let user = support::unique("two-instances");
    let email = email_for(&user);
    w.app.put_user(&user, json!({"email": email})).await;
    let answers = race(&[&w.app, &second], &user, 50).await;
    assert_one_customer(&w.stripe, &email, &answers).await;
}

on_every_store!(
    new_user_gets_a_customer_with_email_name_and_metadata,
    a_nameless_user_gets_no_name,
    second_resolve_is_existing_without_calling_stripe,
    a_customer_carrying_the_user_id_is_adopted,
    a_verified_unique_email_match_is_linked,
    an_unverified_email_match_is_not_linked,
    two_email_matches_are_not_linked,
    another_users_customer_is_never_taken_by_email,
    fifty_concurrent_resolves_make_one_customer,
    two_instances_race_for_one_customer,
);
