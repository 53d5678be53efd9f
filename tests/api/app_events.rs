//! App events end to end: each change billsync makes reaches a receiver that verifies every
//! delivery with the official Standard Webhooks library (`tests/receiver`), in per-user commit
//! order, through a receiver that fails, hangs and goes away; and the pull API pages them
//! without skipping while writers commit.

use std::{collections::HashSet, sync::Arc, time::Duration};

use billsync::{config::settings::AppEventSettings, plans::Plans, store::StoreOptions};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{
    self, eventually,
    receiver::{body, delivering_to, of_key, Receiver},
    Backend, LocalStripe, Registration, TestApp,
};

/// A store whose subscription writes know `plans`.
async fn store_with_plans(backend: Backend, test: &str, plans: &str) -> Option<support::TestStore> {
    let mut options = StoreOptions::new(if backend == Backend::Sqlite { 8 } else { 20 });
    options.plans = Arc::new(Plans::parse(plans).expect("plans"));
    backend.store_with(test, &options).await
}

fn types(deliveries: &[&Value]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| d["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Waits until no outbox job is pending or in flight.
async fn outbox_settled(app: &TestApp) {
    eventually(20, "the outbox drained", || async {
        let pending = app.admin_json("/v1/outbox?state=pending").await;
        let in_flight = app.admin_json("/v1/outbox?state=in_flight").await;
        (pending["jobs"] == json!([]) && in_flight["jobs"] == json!([])).then_some(())
    })
    .await;
}

/// Every event the pull API holds, paged from the start.
async fn pull_all(app: &TestApp) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/app-events?limit=500&after={c}"),
            None => "/v1/app-events?limit=500".to_owned(),
        };
        let page = app.admin_json(&path).await;
        let events = page["events"].as_array().expect("events").clone();
        if events.is_empty() {
            return all;
        }
        all.extend(events);
        cursor = page["next_cursor"].as_str().map(str::to_owned);
    }
}

const PLANS: &str = r#"
default_plan = "free"

[[plans]]
id = "free"
features = ["projects"]
limits = { projects = 1 }

[[plans]]
id = "pro"
prices = ["price_appevents_pro"]
features = ["projects", "exports"]
limits = { projects = 50 }
"#;

/// The must-show: each event type from its real cause, every delivery verified by the
/// official library, per-user order as committed, and billsync's own echo announcing nothing.
async fn every_change_reaches_a_verifying_receiver(backend: Backend) {
    let test = "every_change_reaches_a_verifying_receiver";
    let Some(base) = support::localstripe_url(test) else {
        return;
    };
    let Some(receiver) = Receiver::start(test) else {
        return;
    };
    let Some(t) = store_with_plans(backend, test, PLANS).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plans_file = dir.path().join("plans.toml");
    std::fs::write(&plans_file, PLANS).unwrap();
    let config = delivering_to(support::test_config(&base), &receiver, Some(&plans_file));
    let app = TestApp::spawn(t.store.clone(), &config).await;
    let hook = Registration::new(&base, &app).await;
    let stripe = LocalStripe::new(&base);

    let id = support::unique("announced");
    let email = format!("{id}@example.com");
    // Created: nothing to announce (the app made it). Then an operator's change.
    app.put_user(&id, json!({"email": email, "first_name": "Ada"}))
        .await;
    app.put_user(
        &id,
        json!({"email": email, "first_name": "Ada", "last_name": "Lovelace"}),
    )
    .await;
    let (status, resolved) = app.resolve(&id).await;
    assert_eq!(status, 200, "{resolved}");
    let customer = resolved["customer_id"].as_str().unwrap().to_owned();
    // The operator's change is pushed first: a Stripe edit racing a push loses to it, as the
    // echo rules say, and this test wants the edit to stand.
    outbox_settled(&app).await;

    // A portal edit in Stripe.
    stripe
        .update_customer(&customer, &[("name", "Grace Hopper")])
        .await;
    receiver
        .wait_for(Duration::from_secs(20), |d| {
            of_key(d, &id)
                .iter()
                .any(|d| body(d)["data"]["origin"] == "stripe")
        })
        .await;

    // The person's own edit, pushed to Stripe; its echo comes back as customer.updated.
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

    // A subscription, then the customer deleted in Stripe.
    stripe.subscribe(&customer, "price_appevents_pro").await;
    receiver
        .wait_for(Duration::from_secs(20), |d| {
            types(&of_key(d, &id)).contains(&"plan.changed".to_owned())
        })
        .await;
    stripe.delete_customer(&customer).await;

    // A push that Stripe refuses for good is parked: sync.failed.
    let parked = support::unique("parked");
    support::seed_linked_user(t.store.as_ref(), &parked, "cus_appeventsmissing").await;
    app.put_user(
        &parked,
        json!({"email": format!("{parked}@example.com"), "first_name": "P"}),
    )
    .await;

    let expected = [
        "user.updated",
        "customer.linked",
        "user.updated",
        "user.updated",
        "subscription.created",
        "plan.changed",
        "customer.unlinked",
        "subscription.deleted",
        "plan.changed",
    ];
    let delivered = receiver
        .wait_for(Duration::from_secs(30), |d| {
            of_key(d, &id).len() >= expected.len()
                && types(&of_key(d, &parked)).contains(&"sync.failed".to_owned())
        })
        .await;
    // The echo of the person's edit has had time to come back and be applied.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    app.events_settled().await;
    let delivered_now = receiver.accepted().await;
    let mine = of_key(&delivered_now, &id);
    assert_eq!(types(&mine), expected, "the user's events, in order");
    assert!(delivered.len() <= delivered_now.len());

    let data: Vec<Value> = mine.iter().map(|d| body(d)["data"].clone()).collect();
    assert_eq!(data[0]["origin"], "admin");
    assert_eq!(data[0]["changed"], json!(["last_name"]));
    assert_eq!(data[0]["user"]["last_name"], "Lovelace");
    assert_eq!(
        data[1],
        json!({"user_id": id, "customer_id": customer, "source": "created"})
    );
    assert_eq!(data[2]["origin"], "stripe");
    assert_eq!(data[2]["changed"], json!(["first_name", "last_name"]));
    assert_eq!(data[3]["origin"], "app");
    assert_eq!(data[3]["changed"], json!(["first_name"]));
    assert_eq!(data[4]["subscription"]["status"], "active");
    assert_eq!(data[4]["previous"], json!({}));
    assert_eq!(
        (
            &data[5]["plan"],
            &data[5]["previous_plan"],
            &data[5]["limits"]
        ),
        (&json!("pro"), &json!("free"), &json!({"projects": 50}))
    );
    assert_eq!(data[6]["reason"], "deleted_in_stripe");
    assert_eq!(data[7]["subscription"]["status"], "canceled");
    assert_eq!(data[7]["previous"]["status"], "active");
    assert_eq!(
        (&data[8]["plan"], &data[8]["previous_plan"]),
        (&json!("free"), &json!("pro"))
    );

    let failed = of_key(&delivered_now, &parked);
    let sync_failed = failed
        .iter()
        .find(|d| d["type"] == "sync.failed")
        .expect("sync.failed");
    let sync_failed = body(sync_failed)["data"].clone();
    assert_eq!(sync_failed["kind"], "push_profile");
    assert_eq!(sync_failed["error_code"], "stripe_rejected");

    // The pull API holds the same events, in the same order.
    let pulled: Vec<String> = pull_all(&app)
        .await
        .iter()
        .filter(|e| e["data"]["user_id"] == id.as_str())
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let received: Vec<String> = mine
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        pulled, received,
        "the pull API's order is the delivery order"
    );

    // Erased: the person's events go with them; the app hears a hash.
    let response = app
        .as_user(Method::DELETE, "/api/user/delete-account", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let erased = receiver
        .wait_for(Duration::from_secs(20), |d| {
            d.iter().any(|d| d["type"] == "user.erased")
        })
        .await;
    let erased = erased.iter().find(|d| d["type"] == "user.erased").unwrap();
    let erased = body(erased);
    assert_eq!(erased["data"].as_object().unwrap().len(), 1, "{erased}");
    assert!(!erased.to_string().contains(&id), "no user id in {erased}");
    assert!(!pull_all(&app)
        .await
        .iter()
        .any(|e| e["data"]["user_id"] == id.as_str()));

    // Every delivery verified with the official library, and none carried an id twice
    // without a reason (the receiver never failed here).
    let all = receiver.received().await;
    assert!(
        all.iter().all(|d| d["verified"] == true),
        "unverified: {all:#?}"
    );
    let ids: HashSet<&str> = all.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "a delivery repeated");
    // The library refuses a delivery whose body was changed on the way.
    let raw = all[0]["body"].as_str().unwrap();
    let tampered = receiver
        .verify(
            &raw.replacen("\"data\"", "\"data\" ", 1),
            &all[0]["headers"],
            0,
        )
        .await;
    assert_eq!(tampered["verified"], false, "{tampered}");
    hook.mute().await;
}

/// Writers commit while a reader pages the pull API: the reader sees every event exactly once.
async fn the_pull_api_never_skips_while_writers_commit(backend: Backend) {
    let test = "the_pull_api_never_skips_while_writers_commit";
    let Some(t) = backend.store(test).await else {
        return;
    };
    let app = TestApp::spawn(t.store.clone(), &support::test_config("http://127.0.0.1:9")).await;
    let users: Vec<String> = (0..6)
        .map(|i| support::unique(&format!("writer{i}")))
        .collect();
    for user in &users {
        app.put_user(user, json!({"email": format!("{user}@example.com")}))
            .await;
    }
    let writers: Vec<_> = users
        .iter()
        .map(|user| {
            let (http, url, user) = (app.http.clone(), app.url(&format!("/v1/users/{user}")), user.clone());
            tokio::spawn(async move {
                for round in 0..25 {
                    let response = http
                        .put(&url)
                        .bearer_auth(support::ADMIN_KEY)
                        .json(&json!({"email": format!("{user}@example.com"), "first_name": format!("R{round}")}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    let mut cursor = "0".to_owned();
    let mut done = false;
    loop {
        let page = app
            .admin_json(&format!("/v1/app-events?limit=7&after={cursor}"))
            .await;
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            if done {
                break;
            }
            done = writers.iter().all(tokio::task::JoinHandle::is_finished);
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        seen.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        cursor = page["next_cursor"].as_str().unwrap().to_owned();
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an event seen twice in one pass");
    assert_eq!(seen.len(), users.len() * 25, "every change seen");
    let all: Vec<String> = pull_all(&app)
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all, seen, "one pass saw the total order");
}

on_every_store!(
    every_change_reaches_a_verifying_receiver,
    the_pull_api_never_skips_while_writers_commit,
    plans_follow_the_subscriptions,
    a_changed_plans_file_is_announced_at_start_up,
);

#[tokio::test]
async fn the_pull_api_refuses_what_it_cannot_page() {
    let store = support::sqlite_store().await;
    let app = TestApp::spawn(
        store.store.clone(),
        &support::test_config("http://127.0.0.1:9"),
    )
    .await;
    for (query, status) in [
        ("after=-1", 422),
        ("after=abc", 422),
        ("state=lost", 422),
        ("state=failed&after=3", 422),
        ("colour=red", 422),
        ("after=0&limit=5", 200),
    ] {
        let response = app
            .admin(Method::GET, &format!("/v1/app-events?{query}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{query}");
        if status != 200 {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "invalid_request", "{query}: {body}");
        }
    }
    let missing = app
        .admin(Method::POST, "/v1/app-events/msg_nope/redeliver")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "app_event_not_found");
}

const TIERS: &str = r#"
default_plan = "free"
grace_statuses = ["past_due"]

[[plans]]
id = "free"
features = ["projects"]
limits = { projects = 1 }

[[plans]]
id = "pro"
prices = ["price_tier_pro", "lookup:pro_yearly"]
features = ["projects", "exports"]
limits = { projects = 50 }

[[plans]]
id = "team"
prices = ["price_tier_team"]
features = ["projects", "exports", "sso"]
limits = { projects = 500 }
"#;

/// An event, the plan it leaves the user on, and the `plan.changed` it makes (from, to).
type Step = (String, &'static str, Option<(&'static str, &'static str)>);

/// A signed `customer.subscription.*` event for one subscription of `customer`.
fn subscription_event(
    kind: &str,
    created: i64,
    customer: &str,
    subscription: &str,
    status: &str,
    price: &str,
    cancel_at_period_end: bool,
) -> String {
    json!({
        "id": format!("evt_{}", uuid::Uuid::new_v4().simple()), "object": "event", "type": kind, "created": created,
        "livemode": false, "api_version": billsync::config::DEFAULT_STRIPE_API_VERSION,
        "data": {"object": {
            "id": subscription, "object": "subscription", "customer": customer,
            "status": status, "cancel_at_period_end": cancel_at_period_end,
            "items": {"object": "list", "data": [{
                "id": format!("si_{subscription}"), "quantity": 1,
                "price": {"id": price, "lookup_key": null},
                "current_period_end": created + 30 * 86_400,
            }]},
        }},
    })
    .to_string()
}

/// The plan across an upgrade, a downgrade, a cancellation at period end, `past_due` with and
/// without grace, and two live subscriptions: the billing read and `plan.changed`.
async fn plans_follow_the_subscriptions(backend: Backend) {
    let test = "plans_follow_the_subscriptions";
    let dir = tempfile::tempdir().unwrap();
    for grace in [true, false] {
        let tiers = if grace {
            TIERS.to_owned()
        } else {
            TIERS.replace(r#"grace_statuses = ["past_due"]"#, "")
        };
        let Some(t) = store_with_plans(backend, test, &tiers).await else {
            return;
        };
        let plans_file = dir.path().join(format!("plans-{grace}.toml"));
        std::fs::write(&plans_file, &tiers).unwrap();
        let mut config = support::test_config("http://127.0.0.1:9");
        config.app_events = AppEventSettings {
            plans_file: Some(plans_file),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let app = TestApp::spawn(t.store.clone(), &config).await;
        let user = support::unique("planned");
        let customer = format!("cus_{}", user.replace('-', ""));
        support::seed_linked_user(t.store.as_ref(), &user, &customer).await;
        let billing = || async { app.admin_json(&format!("/v1/users/{user}/billing")).await };
        let plan_changes = || async {
            pull_all(&app)
                .await
                .into_iter()
                .filter(|e| e["type"] == "plan.changed" && e["data"]["user_id"] == user.as_str())
                .map(|e| {
                    (
                        e["data"]["previous_plan"].clone(),
                        e["data"]["plan"].clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut created = 1_700_000_000;
        let mut step = |kind: &'static str,
                        sub: &'static str,
                        status: &'static str,
                        price: &'static str,
                        cancel: bool| {
            created += 10;
            subscription_event(kind, created, &customer, sub, status, price, cancel)
        };
        let mut expected_changes: Vec<(Value, Value)> = Vec::new();
        let mut change = |from: &str, to: &str| expected_changes.push((json!(from), json!(to)));
        let before = billing().await;
        assert_eq!(before["plan"]["id"], "free", "{before}");
        assert_eq!(before["customer"]["id"], customer.as_str());

        let scenario: Vec<Step> = vec![
            (
                step(
                    "customer.subscription.created",
                    "sub_a",
                    "active",
                    "price_tier_pro",
                    false,
                ),
                "pro",
                Some(("free", "pro")),
            ),
            (
                step(
                    "customer.subscription.updated",
                    "sub_a",
                    "active",
                    "price_tier_team",
                    false,
                ),
                "team",
                Some(("pro", "team")),
            ),
            (
                step(
                    "customer.subscription.updated",
                    "sub_a",
                    "active",
                    "price_tier_pro",
                    false,
                ),
                "pro",
                Some(("team", "pro")),
            ),
            // Canceled at period end: still paid for until then.
            (
                step(
                    "customer.subscription.updated",
                    "sub_a",
                    "active",
                    "price_tier_pro",
                    true,
                ),
                "pro",
                None,
            ),
            (
                step(
                    "customer.subscription.updated",
                    "sub_a",
                    "past_due",
                    "price_tier_pro",
                    true,
                ),
                if grace { "pro" } else { "free" },
                if grace { None } else { Some(("pro", "free")) },
            ),
            (
                step(
                    "customer.subscription.created",
                    "sub_b",
                    "active",
                    "price_tier_team",
                    false,
                ),
                "team",
                Some((if grace { "pro" } else { "free" }, "team")),
            ),
            (
                step(
                    "customer.subscription.deleted",
                    "sub_b",
                    "canceled",
                    "price_tier_team",
                    false,
                ),
                if grace { "pro" } else { "free" },
                Some(("team", if grace { "pro" } else { "free" })),
            ),
        ];
        for (body, plan, expected) in scenario {
            app.deliver_webhook(&body).await;
            app.events_settled().await;
            if let Some((from, to)) = expected {
                change(from, to);
            }
            let read = billing().await;
            assert_eq!(read["plan"]["id"], plan, "grace {grace}: {body}\n{read}");
        }
        assert_eq!(plan_changes().await, expected_changes, "grace {grace}");

        let read = billing().await;
        let subscriptions = read["subscriptions"].as_array().unwrap();
        assert_eq!(subscriptions.len(), 2, "{read}");
        let a = subscriptions.iter().find(|s| s["id"] == "sub_a").unwrap();
        assert_eq!(a["status"], "past_due");
        assert_eq!(a["cancel_at_period_end"], true);
        assert_eq!(a["items"][0]["price_id"], "price_tier_pro");
        assert_eq!(a["plan"], if grace { json!("pro") } else { Value::Null });
        let b = subscriptions.iter().find(|s| s["id"] == "sub_b").unwrap();
        assert_eq!(
            (&b["status"], &b["plan"]),
            (&json!("canceled"), &Value::Null)
        );
        assert_eq!(
            read["plan"]["features"],
            if grace {
                json!(["projects", "exports"])
            } else {
                json!(["projects"])
            }
        );

        // The person reads the same document with their token; the admin's user view carries
        // the subscriptions too.
        let token = support::user_token(&user, Some(&format!("{user}@example.com")), None);
        let own: Value = app
            .as_user(Method::GET, "/api/user/billing", &token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(own, read);
        let admin_view = app.admin_json(&format!("/v1/users/{user}")).await;
        assert_eq!(admin_view["subscriptions"], read["subscriptions"]);
        let unknown = app
            .admin(Method::GET, "/v1/users/nobody/billing")
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 404);
    }
}

/// The plans file changed between two starts: each user whose computed plan (or what it
/// grants) changed hears `plan.changed` once, even with two instances starting together;
/// those it does not change hear nothing; a third start with the same file tells nobody.
async fn a_changed_plans_file_is_announced_at_start_up(backend: Backend) {
    let test = "a_changed_plans_file_is_announced_at_start_up";
    let dir = tempfile::tempdir().unwrap();
    let start = |store: Arc<dyn billsync::store::Store>, plans: &str, name: &str| {
        let plans_file = dir.path().join(name);
        std::fs::write(&plans_file, plans).unwrap();
        let mut config = support::test_config("http://127.0.0.1:9");
        config.app_events = AppEventSettings {
            plans_file: Some(plans_file),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        async move { TestApp::spawn(store, &config).await }
    };
    let Some(t) = store_with_plans(backend, test, TIERS).await else {
        return;
    };
    let first = start(t.store.clone(), TIERS, "before.toml").await;
    let users: Vec<String> = ["free", "pro", "team"]
        .iter()
        .map(|tier| support::unique(&format!("plan-{tier}")))
        .collect();
    for (user, price) in users
        .iter()
        .zip([None, Some("price_tier_pro"), Some("price_tier_team")])
    {
        let customer = format!("cus_{}", user.replace('-', ""));
        support::seed_linked_user(t.store.as_ref(), user, &customer).await;
        if let Some(price) = price {
            let event = subscription_event(
                "customer.subscription.created",
                1_700_000_000,
                &customer,
                &format!("sub_{}", user.replace('-', "")),
                "active",
                price,
                false,
            );
            first.deliver_webhook(&event).await;
        }
    }
    first.events_settled().await;
    eventually(15, "the first file recorded", || async {
        t.store.plans_file_announced().await.unwrap().then_some(())
    })
    .await;
    let told_before = pull_all(&first).await.len();
    drop(first);

    // The free plan grants more; `team` is gone and its price now grants `pro`.
    let changed = r#"
default_plan = "free"
grace_statuses = ["past_due"]

[[plans]]
id = "free"
features = ["projects"]
limits = { projects = 3 }

[[plans]]
id = "pro"
prices = ["price_tier_pro", "lookup:pro_yearly", "price_tier_team"]
features = ["projects", "exports"]
limits = { projects = 50 }
"#;
    let reopen = || async {
        let mut options = StoreOptions::new(if backend == Backend::Sqlite { 8 } else { 20 });
        options.plans = Arc::new(Plans::parse(changed).unwrap());
        billsync::store::connect_with(&t.url, &options)
            .await
            .unwrap()
    };
    let store = reopen().await;
    assert!(!store.plans_file_announced().await.unwrap());
    let (a, b) = tokio::join!(
        start(store.clone(), changed, "after-a.toml"),
        start(reopen().await, changed, "after-b.toml"),
    );
    eventually(15, "the changed file announced", || async {
        store.plans_file_announced().await.unwrap().then_some(())
    })
    .await;
    let announced = |events: Vec<Value>| -> Vec<(String, Value, Value, Value)> {
        let mut found: Vec<_> = events
            .into_iter()
            .filter(|e| e["type"] == "plan.changed")
            .map(|e| {
                let d = &e["data"];
                (
                    d["user_id"].as_str().unwrap().to_owned(),
                    d["previous_plan"].clone(),
                    d["plan"].clone(),
                    d["limits"].clone(),
                )
            })
            .collect();
        found.sort_by(|x, y| x.0.cmp(&y.0));
        found
    };
    let all = pull_all(&a).await;
    let new = announced(all[told_before..].to_vec());
    let mut expected = vec![
        (
            users[0].clone(),
            json!("free"),
            json!("free"),
            json!({"projects": 3}),
        ),
        (
            users[2].clone(),
            json!("team"),
            json!("pro"),
            json!({"projects": 50}),
        ),
    ];
    expected.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(new, expected, "{:#?}", &all[told_before..]);
    // The billing read agrees with what was announced.
    let read = a
        .admin_json(&format!("/v1/users/{}/billing", users[2]))
        .await;
    assert_eq!(read["plan"]["id"], "pro", "{read}");
    let total = all.len();
    drop((a, b));

    let again = start(reopen().await, changed, "again.toml").await;
    // Give a pass, if one wrongly started, the time to tell someone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pull_all(&again).await.len(),
        total,
        "a second start told someone"
    );
}
