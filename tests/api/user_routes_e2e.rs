//! The user routes end to end: a real server with its outbox worker, a real store (both
//! backends), localstripe as Stripe (behind a proxy that can cut it off).

use crate::support;

use reqwest::Method;
use serde_json::{json, Value};
use support::{eventually, Backend, CuttableProxy, LocalStripe, TestApp};

struct World {
    app: TestApp,
    stripe: LocalStripe,
    proxy: CuttableProxy,
    _store: support::TestStore,
}

async fn world(backend: Backend, test: &str) -> Option<World> {
    let base = support::localstripe_url(test)?;
    let store = backend.store(test).await?;
    let proxy = CuttableProxy::start(&base).await;
    let mut config = support::test_config(&proxy.url);
    config.stripe.max_retries = 1;
    // Generous: localstripe slows down when every suite runs at once; an outage here is a cut
    // connection, which fails at once whatever the timeout.
    config.stripe.timeout = std::time::Duration::from_secs(3);
    let app = TestApp::spawn(store.store.clone(), &config).await;
    Some(World {
        app,
        stripe: LocalStripe::new(&base),
        proxy,
        _store: store,
    })
}

/// A user with a Stripe customer, and their token.
async fn linked_user(w: &World, prefix: &str) -> (String, String, String) {
    let user = support::unique(prefix);
    let email = format!("{user}@example.com");
    w.app
        .put_user(
            &user,
            json!({"email": email, "first_name": "Ada", "last_name": "Lovelace"}),
        )
        .await;
    let (status, body) = w.app.resolve(&user).await;
    assert_eq!(status, 200, "{body}");
    let token = support::user_token(&user, Some(&email), Some(json!(true)));
    (
        user,
        token,
        body["customer_id"].as_str().unwrap().to_owned(),
    )
}

async fn put_profile(w: &World, token: &str, body: Value) -> (u16, Value) {
    support::status_and_json(
        w.app
            .as_user(Method::PUT, "/api/user/profile", token)
            .json(&body),
    )
    .await
}

async fn profile_update_reaches_stripe(backend: Backend) {
    let Some(w) = world(backend, "profile_update_reaches_stripe").await else {
        return;
    };
    let (user, token, customer) = linked_user(&w, "profile").await;
    let (status, body) = put_profile(
        &w,
        &token,
        json!({"firstName": "Grace", "lastName": "Hopper", "phone": "+14155550199"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let data = &body["data"];
    assert_eq!(data["id"], user.as_str());
    assert_eq!(data["first_name"], "Grace");
    assert_eq!(data["phone"], "+14155550199");
    assert!(data["updated_at"].is_string());

    let synced = eventually(10, "the push to Stripe", || async {
        let c = w.stripe.customer(&customer).await;
        (c["name"] == "Grace Hopper" && c["phone"] == "+14155550199").then_some(c)
    })
    .await;
    assert_eq!(synced["email"], format!("{user}@example.com"));
    assert_eq!(synced["metadata"]["synced_from"], "billsync");
    assert!(synced["metadata"]["last_profile_sync"].is_string());
    assert_eq!(
        synced["metadata"]["userId"],
        user.as_str(),
        "merged, not replaced"
    );

    // Clearing the phone clears it in Stripe too (an empty value).
    put_profile(&w, &token, json!({"phone": ""})).await;
    eventually(10, "the phone cleared in Stripe", || async {
        let c = w.stripe.customer(&customer).await;
        (c["phone"] == "" || c["phone"].is_null()).then_some(())
    })
    .await;
}

async fn a_burst_of_edits_makes_few_pushes(backend: Backend) {
    let Some(w) = world(backend, "a_burst_of_edits_makes_few_pushes").await else {
        return;
    };
    let (_user, token, customer) = linked_user(&w, "burst").await;
    let calls_before = w.app.state.stripe.attempts_sent();
    for i in 0..10 {
        let (status, _) = put_profile(&w, &token, json!({"firstName": format!("Edit{i}")})).await;
        assert_eq!(status, 200);
    }
    eventually(10, "the last edit in Stripe", || async {
        (w.stripe.customer(&customer).await["name"] == "Edit9 Lovelace").then_some(())
    })
    .await;
    // Let any straggling push run before counting.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let calls = w.app.state.stripe.attempts_sent() - calls_before;
    assert!(calls <= 3, "{calls} Stripe calls for 10 edits");
    assert_eq!(w.stripe.customer(&customer).await["name"], "Edit9 Lovelace");
}

async fn an_edit_during_a_stripe_outage_arrives_later(backend: Backend) {
    let Some(w) = world(backend, "an_edit_during_a_stripe_outage_arrives_later").await else {
        return;
    };
    let (_user, token, customer) = linked_user(&w, "outage").await;
    w.proxy.set_up(false).await;
    let (status, _) = put_profile(&w, &token, json!({"lastName": "Offline"})).await;
    assert_eq!(status, 200, "the user's request does not wait on Stripe");
    // The push fails and is retried while Stripe is away.
    let job = eventually(10, "a failed push attempt", || async {
        let jobs: Value = w
            .app
            .admin(Method::GET, "/v1/outbox?state=pending")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["attempts"].as_i64() >= Some(2) && j["last_error"].is_string())
            .cloned()
    })
    .await;
    assert!(
        job["last_error"].as_str().unwrap().contains("unreachable"),
        "{job}"
    );
    assert_eq!(w.stripe.customer(&customer).await["name"], "Ada Lovelace");
    w.proxy.set_up(true).await;
    eventually(15, "the change after Stripe came back", || async {
        (w.stripe.customer(&customer).await["name"] == "Ada Offline").then_some(())
    })
    .await;
}

async fn export_contains_every_section(backend: Backend) {
    let Some(w) = world(backend, "export_contains_every_section").await else {
        return;
    };
    let (user, token, customer) = linked_user(&w, "export").await;
    let id = billsync::domain::UserId::parse(&user).unwrap();
    for i in 0..1_205 {
        w.app
            .state
            .store
            .insert_usage_record(&id, "api_calls", i, billsync::store::now())
            .await
            .unwrap();
    }
    w.app
        .state
        .store
        .upsert_subscription_if_newer(
            &billsync::store::SubscriptionMirror {
                id: "sub_export".into(),
                user_id: Some(id.clone()),
                customer_id: customer.clone(),
                status: "active".into(),
                price_id: Some("price_pro".into()),
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
    let response = w
        .app
        .as_user(Method::GET, "/api/user/export-data", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-disposition"],
        format!("attachment; filename=\"customer-data-{user}.json\"").as_str()
    );
    let export: Value = response
        .json()
        .await
        .expect("the export is one JSON document");
    assert_eq!(export["export_version"], "3.0");
    assert!(export["export_timestamp"].is_string());
    assert_eq!(export["user_profile"]["id"], user.as_str());
    assert_eq!(export["user_profile"]["first_name"], "Ada");
    assert_eq!(
        export["customer_link"]["stripe_customer_id"],
        customer.as_str()
    );
    assert_eq!(export["subscriptions"][0]["id"], "sub_export");
    assert_eq!(export["stripe_customer"]["id"], customer.as_str());
    assert_eq!(
        export["stripe_customer"]["email"],
        format!("{user}@example.com")
    );
    // Stripe's customer as it comes, fields billsync does not model included.
    assert_eq!(export["stripe_customer"]["object"], "customer");
    assert!(export["stripe_customer"]
        .as_object()
        .unwrap()
        .contains_key("invoice_settings"));
    assert!(export["stripe_invoices"].is_array());
    // localstripe has no GET /v1/customers/{id}/payment_methods: said, not hidden.
    assert_eq!(
        export["warnings"],
        json!(["stripe_payment_methods could not be retrieved from Stripe"])
    );
    assert!(export["stripe_payment_methods"].is_null());
    for section in ["outbox_jobs", "audit_entries", "stored_webhook_events"] {
        assert!(export[section].is_array(), "{section}: {}", export[section]);
    }
    assert!(export.as_object().unwrap().contains_key("pushed_profile"));
    let usage = export["usage_records"].as_array().unwrap();
    assert_eq!(usage.len(), 1_205, "every record, none dropped");
    assert_eq!(usage[0]["quantity"], 0);
    assert_eq!(usage[1_204]["quantity"], 1_204);

    // Stripe down: the export still succeeds, says what is missing.
    w.proxy.set_up(false).await;
    let export: Value = w
        .app
        .as_user(Method::GET, "/api/user/export-data", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(export["stripe_customer"], Value::Null);
    assert!(!export["warnings"].as_array().unwrap().is_empty());
    assert_eq!(export["usage_records"].as_array().unwrap().len(), 1_205);
}

async fn erasure_keeps_a_scrubbed_customer_by_default(backend: Backend) {
    let test = "erasure_keeps_a_scrubbed_customer_by_default";
    let Some(w) = world(backend, test).await else {
        return;
    };
    let (user, token, customer) = linked_user(&w, "scrub").await;
    let subscription = w.stripe.subscribe(&customer, "pro-monthly").await;
    assert_eq!(subscription["status"], "active");

    let response = w
        .app
        .as_user(Method::DELETE, "/api/user/delete-account", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"success": true, "message": "Account deleted successfully"})
    );

    let kept = w.stripe.customer(&customer).await;
    assert_eq!(kept["id"], customer.as_str(), "the customer is kept");
    assert!(kept["name"].is_null() || kept["name"] == "", "{kept}");
    assert!(kept["phone"].is_null() || kept["phone"] == "");
    for key in ["source", "created_at"] {
        assert!(
            kept["metadata"][key].is_null() || kept["metadata"][key] == "",
            "{key}: {kept}"
        );
    }
    // A tombstone, not the user id: the customer can never be linked to a newcomer by email.
    let hash = billsync::gdpr::subject_hash(&billsync::domain::UserId::parse(&user).unwrap());
    assert_eq!(kept["metadata"]["userId"], format!("erased:{hash}"));
    let newcomer = support::unique("newcomer");
    assert!(kept["email"].is_null() || kept["email"] == "", "{kept}");
    let email = format!("{user}@example.com");
    w.app
        .put_user(&newcomer, json!({"email": email, "email_verified": true}))
        .await;
    let (status, resolved) = w.app.resolve(&newcomer).await;
    assert_eq!(status, 200);
    assert_eq!(
        resolved["source"], "created",
        "not linked to the erased customer"
    );
    assert_ne!(resolved["customer_id"], customer.as_str());
    let sub = w
        .stripe
        .subscription(subscription["id"].as_str().unwrap())
        .await;
    assert_eq!(sub["status"], "canceled");

    let local = w
        .app
        .admin(Method::GET, &format!("/v1/users/{user}"))
        .send()
        .await
        .unwrap();
    assert_eq!(local.status(), 404, "no local data left");
    let hash = billsync::gdpr::subject_hash(&billsync::domain::UserId::parse(&user).unwrap());
    let audit = w.app.state.store.audit_for_subject(&hash).await.unwrap();
    let entry = audit.last().expect("audit entry");
    assert_eq!(entry.action, "account_erased");
    assert_eq!(entry.detail["delete_from_stripe"], false);
    assert!(
        !format!("{audit:?}").contains(&user),
        "no personal data in the audit log"
    );

    // Again: safe, and still "deleted".
    let again = w
        .app
        .as_user(Method::DELETE, "/api/user/delete-account", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
}

async fn erasure_can_delete_the_customer(backend: Backend) {
    let Some(w) = world(backend, "erasure_can_delete_the_customer").await else {
        return;
    };
    let (user, token, customer) = linked_user(&w, "delete").await;
    let subscription = w.stripe.subscribe(&customer, "pro-monthly").await;
    let response = w
        .app
        .as_user(Method::DELETE, "/api/user/delete-account", &token)
        .json(&json!({"deleteFromStripe": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        w.stripe.customer_status(&customer).await,
        404,
        "the customer is deleted"
    );
    // localstripe keeps subscriptions of deleted customers: billsync cancelled it first.
    let sub = w
        .stripe
        .subscription(subscription["id"].as_str().unwrap())
        .await;
    assert_eq!(sub["status"], "canceled");
    let local = w
        .app
        .admin(Method::GET, &format!("/v1/users/{user}"))
        .send()
        .await
        .unwrap();
    assert_eq!(local.status(), 404);
}

async fn erasure_during_an_outage_finishes_later(backend: Backend) {
    let Some(w) = world(backend, "erasure_during_an_outage_finishes_later").await else {
        return;
    };
    let (user, token, customer) = linked_user(&w, "later").await;
    w.proxy.set_up(false).await;
    let response = w
        .app
        .as_user(Method::DELETE, "/api/user/delete-account", &token)
        .json(&json!({"deleteFromStripe": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"success": true, "status": "pending"})
    );
    // Repeating joins the same saga.
    let again = w
        .app
        .as_user(Method::DELETE, "/api/user/delete-account", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 202);
    let profile = put_profile(&w, &token, json!({"firstName": "Zombie"})).await;
    assert_eq!(
        profile.0, 409,
        "no edits while the account is being deleted: {}",
        profile.1
    );
    assert_eq!(w.stripe.customer_status(&customer).await, 200);

    w.proxy.set_up(true).await;
    eventually(15, "the queued erasure", || async {
        let local = w
            .app
            .admin(Method::GET, &format!("/v1/users/{user}"))
            .send()
            .await
            .unwrap();
        (local.status() == 404).then_some(())
    })
    .await;
    assert_eq!(w.stripe.customer_status(&customer).await, 404);
}

async fn portal_needs_a_customer(backend: Backend) {
    let Some(w) = world(backend, "portal_needs_a_customer").await else {
        return;
    };
    let user = support::unique("no-customer");
    let token = support::user_token(&user, Some(&format!("{user}@example.com")), None);
    let response = w
        .app
        .as_user(Method::POST, "/api/billing/create-portal-session", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_customer");
}

/// Waits until the user's current profile is in Stripe with no push left to send, and returns
/// the customer as Stripe then holds it: the body of that push's `customer.updated`.
async fn landed(w: &World, user: &str, customer: &str) -> Value {
    eventually(15, "the local profile in Stripe", || async {
        let local = w
            .app
            .admin_json(&format!("/v1/users/{}", support::encode(user)))
            .await["user"]
            .clone();
        let name = [&local["first_name"], &local["last_name"]]
            .iter()
            .filter_map(|part| part.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let mut busy = false;
        for state in ["pending", "in_flight"] {
            let jobs = w
                .app
                .admin_json(&format!("/v1/outbox?state={state}&limit=1000"))
                .await;
            busy |= jobs["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|job| job["user_id"] == user);
        }
        let remote = w.stripe.customer(customer).await;
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        (!busy
            && remote["email"] == local["email"]
            && text(&remote["name"]) == name
            && text(&remote["phone"]) == text(&local["phone"]))
        .then_some(remote)
    })
    .await
}

/// `customer.updated` carrying `snapshot`, as Stripe would send it `created` seconds in.
fn updated_event(snapshot: &Value, created: i64) -> String {
    json!({"id": format!("evt_{}", uuid::Uuid::new_v4().simple()), "object": "event", "type": "customer.updated",
           "created": created, "livemode": false, "data": {"object": snapshot}})
    .to_string()
}

fn epoch() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Ends with `expected` (first, last, phone) both in billsync and in Stripe.
async fn both_sides_hold(w: &World, user: &str, customer: &str, expected: (&str, &str, &str)) {
    let (first, last, phone) = expected;
    let local = w
        .app
        .admin_json(&format!("/v1/users/{}", support::encode(user)))
        .await;
    assert_eq!(
        (
            local["user"]["first_name"].as_str(),
            local["user"]["last_name"].as_str(),
            local["user"]["phone"].as_str().unwrap_or_default()
        ),
        (Some(first), Some(last), phone),
        "billsync's copy"
    );
    let remote = landed(w, user, customer).await;
    assert_eq!(remote["name"], format!("{first} {last}"), "Stripe's copy");
    assert_eq!(remote["phone"].as_str().unwrap_or_default(), phone);
}

/// Two edits, each pushed and landed in Stripe: the user, their token, their customer, the
/// events' base time, and Stripe's copy after each push (the bodies of their echoes).
async fn two_landed_edits(w: &World, prefix: &str) -> (String, String, String, i64, Value, Value) {
    let (user, token, customer) = linked_user(w, prefix).await;
    let t = epoch();
    put_profile(w, &token, json!({"firstName": "Grace"})).await;
    let first = landed(w, &user, &customer).await;
    put_profile(w, &token, json!({"lastName": "Hopper"})).await;
    let second = landed(w, &user, &customer).await;
    (user, token, customer, t, first, second)
}

async fn late_echoes_in_order_never_revert_newer_edits(backend: Backend) {
    let Some(w) = world(backend, "late_echoes_in_order_never_revert_newer_edits").await else {
        return;
    };
    let (user, token, customer, t, first, second) = two_landed_edits(&w, "late-echo").await;
    // The first push's echo arrives after the second push landed, as Stripe may send it.
    w.app.deliver_webhook(&updated_event(&first, t + 1)).await;
    w.app.events_settled().await;
    // A further edit while the second echo is still on its way.
    put_profile(&w, &token, json!({"phone": "+14155550100"})).await;
    let third = landed(&w, &user, &customer).await;
    w.app.deliver_webhook(&updated_event(&second, t + 2)).await;
    w.app.deliver_webhook(&updated_event(&third, t + 3)).await;
    w.app.events_settled().await;
    both_sides_hold(&w, &user, &customer, ("Grace", "Hopper", "+14155550100")).await;
}

async fn late_echoes_reversed_never_revert_newer_edits(backend: Backend) {
    let Some(w) = world(backend, "late_echoes_reversed_never_revert_newer_edits").await else {
        return;
    };
    let (user, token, customer, t, first, second) = two_landed_edits(&w, "reversed-echo").await;
    w.app.deliver_webhook(&updated_event(&second, t + 2)).await;
    w.app.deliver_webhook(&updated_event(&first, t + 1)).await;
    put_profile(&w, &token, json!({"phone": "+14155550100"})).await;
    let third = landed(&w, &user, &customer).await;
    w.app.events_settled().await;
    // Two of them once more, newest first, after everything.
    w.app.deliver_webhook(&updated_event(&third, t + 3)).await;
    w.app.deliver_webhook(&updated_event(&first, t + 1)).await;
    w.app.events_settled().await;
    both_sides_hold(&w, &user, &customer, ("Grace", "Hopper", "+14155550100")).await;
}

async fn a_portal_edit_between_two_pushes_is_kept(backend: Backend) {
    let Some(w) = world(backend, "a_portal_edit_between_two_pushes_is_kept").await else {
        return;
    };
    let (user, token, customer) = linked_user(&w, "portal-between").await;
    let t = epoch();
    put_profile(&w, &token, json!({"firstName": "Grace"})).await;
    let first = landed(&w, &user, &customer).await;
    // The person changes their phone in the billing portal.
    let portal = w
        .stripe
        .update_customer(&customer, &[("phone", "+14155550111")])
        .await;
    w.app.deliver_webhook(&updated_event(&portal, t + 2)).await;
    w.app.events_settled().await;
    let local = w
        .app
        .admin_json(&format!("/v1/users/{}", support::encode(&user)))
        .await;
    assert_eq!(
        local["user"]["phone"], "+14155550111",
        "a Stripe-side change is applied"
    );
    put_profile(&w, &token, json!({"lastName": "Hopper"})).await;
    let second = landed(&w, &user, &customer).await;
    // The first push's echo, late, and the second's.
    w.app.deliver_webhook(&updated_event(&first, t + 1)).await;
    w.app.deliver_webhook(&updated_event(&second, t + 3)).await;
    w.app.events_settled().await;
    both_sides_hold(&w, &user, &customer, ("Grace", "Hopper", "+14155550111")).await;
}

async fn an_admins_email_changes_stay_verified(backend: Backend) {
    let Some(w) = world(backend, "an_admins_email_changes_stay_verified").await else {
        return;
    };
    let user = support::unique("emails");
    let profile =
        |email: &str| json!({"email": email, "email_verified": true, "first_name": "Ada"});
    w.app.put_user(&user, profile("a@example.com")).await;
    let (status, body) = w.app.resolve(&user).await;
    assert_eq!(status, 200, "{body}");
    let customer = body["customer_id"].as_str().unwrap().to_owned();
    let t = epoch();
    w.app.put_user(&user, profile("b@example.com")).await;
    let first = landed(&w, &user, &customer).await;
    w.app.put_user(&user, profile("c@example.com")).await;
    let second = landed(&w, &user, &customer).await;
    // Each applied on its own (two waiting together would be folded into the newer one).
    w.app.deliver_webhook(&updated_event(&first, t + 1)).await;
    w.app.events_settled().await;
    w.app.deliver_webhook(&updated_event(&second, t + 2)).await;
    w.app.events_settled().await;
    let local = w
        .app
        .admin_json(&format!("/v1/users/{}", support::encode(&user)))
        .await;
    assert_eq!(local["user"]["email"], "c@example.com");
    assert_eq!(
        local["user"]["email_verified"], true,
        "billsync's own echo never unverifies"
    );
    assert_eq!(w.stripe.customer(&customer).await["email"], "c@example.com");
}

async fn newer_tokens_carry_newer_identity(backend: Backend) {
    let Some(w) = world(backend, "newer_tokens_carry_newer_identity").await else {
        return;
    };
    let user = support::unique("identity");
    let email = format!("{user}@example.com");
    let token = |email: &str, verified: Option<bool>, iat: Option<i64>| {
        let mut claims = json!({"sub": user, "aud": "authenticated", "email": email,
                                "exp": epoch() + 3600});
        if let Some(verified) = verified {
            claims["email_verified"] = verified.into();
        }
        if let Some(iat) = iat {
            claims["iat"] = iat.into();
        }
        support::sign_hs256(&claims)
    };
    let row = || async {
        w.app
            .admin_json(&format!("/v1/users/{}", support::encode(&user)))
            .await["user"]
            .clone()
    };
    let now = epoch();
    // Signed up, not verified yet.
    let (status, _) = put_profile(
        &w,
        &token(&email, Some(false), Some(now - 60)),
        json!({"firstName": "Ada"}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = w.app.resolve(&user).await;
    assert_eq!(status, 200, "{body}");
    let customer = body["customer_id"].as_str().unwrap().to_owned();
    assert_eq!(row().await["email_verified"], false);

    // Verified in Supabase Auth since: the next token says so.
    put_profile(&w, &token(&email, Some(true), Some(now + 2)), json!({})).await;
    assert_eq!(
        row().await["email_verified"],
        true,
        "a newer token verifies"
    );

    // A token issued before that change, or one without `iat`, never overwrites it.
    put_profile(&w, &token(&email, Some(false), Some(now - 30)), json!({})).await;
    put_profile(
        &w,
        &token("stale@example.com", Some(false), None),
        json!({}),
    )
    .await;
    let unchanged = row().await;
    assert_eq!(
        (
            unchanged["email"].as_str(),
            unchanged["email_verified"].as_bool()
        ),
        (Some(email.as_str()), Some(true)),
        "older tokens change nothing"
    );

    // The address changed in Supabase Auth: billsync and Stripe follow.
    let changed = format!("new-{email}");
    let (status, body) =
        put_profile(&w, &token(&changed, Some(true), Some(now + 4)), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["email"], changed.as_str());
    assert_eq!(row().await["email_verified"], true);
    let remote = landed(&w, &user, &customer).await;
    assert_eq!(remote["email"], changed.as_str());
}

/// Supabase tokens live an hour and cannot be revoked: the token that deleted the account
/// must not bring the person back, while a token issued after the erasure starts anew.
async fn an_erased_person_stays_erased(backend: Backend) {
    let Some(w) = world(backend, "an_erased_person_stays_erased").await else {
        return;
    };
    let (user, token, _customer) = linked_user(&w, "tombstone").await;
    let email = format!("{user}@example.com");
    let delete = |token: String| {
        let app = &w.app;
        async move {
            support::status_and_json(app.as_user(
                Method::DELETE,
                "/api/user/delete-account",
                &token,
            ))
            .await
        }
    };
    assert_eq!(delete(token.clone()).await.0, 200);

    // The same token, still valid: refused everywhere, and nothing is re-created.
    let (status, body) = put_profile(&w, &token, json!({"firstName": "Back"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (410, Some("account_erased"))
    );
    for (method, path) in [
        (Method::GET, "/api/user/export-data"),
        (Method::POST, "/api/billing/create-portal-session"),
    ] {
        let response = w.app.as_user(method, path, &token).send().await.unwrap();
        assert_eq!(response.status(), 410, "{path}");
    }
    let row = w
        .app
        .admin_json(&format!("/v1/users/{}", support::encode(&user)))
        .await;
    assert_eq!(row["error"]["code"], "user_not_found", "{row}");
    // Repeating the deletion is still safe.
    assert_eq!(delete(token.clone()).await.0, 200);

    // The tombstone names a keyed hash, not the id nor its plain SHA-256.
    let id = billsync::domain::UserId::parse(&user).unwrap();
    let store = w.app.state.store.as_ref();
    let keyed = w
        .app
        .state
        .worker
        .tombstones()
        .subject(store, &id)
        .await
        .unwrap();
    assert!(store.tombstone(&keyed).await.unwrap().is_some());
    assert_ne!(keyed, billsync::gdpr::subject_hash(&id));
    assert!(store.tombstone(&user).await.unwrap().is_none());

    // A token without iat cannot tell when it was issued: refused.
    let no_iat = support::sign_hs256(&json!({"sub": user, "aud": "authenticated",
        "email": email, "exp": epoch() + 3600}));
    assert_eq!(put_profile(&w, &no_iat, json!({})).await.0, 410);

    // Signed in again after the erasure: a new, empty account.
    let fresh = support::sign_hs256(&json!({"sub": user, "aud": "authenticated",
        "email": email, "email_verified": true, "iat": epoch() + 2, "exp": epoch() + 3600}));
    let (status, body) = put_profile(&w, &fresh, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["data"]["first_name"].is_null(),
        "nothing of the old account"
    );
    let row = w
        .app
        .admin_json(&format!("/v1/users/{}", support::encode(&user)))
        .await;
    assert!(row["customer"].is_null(), "no customer linked: {row}");
    // The old token never reaches the new account, not even to delete it.
    let (status, body) = delete(token.clone()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (410, Some("account_erased"))
    );
    assert_eq!(put_profile(&w, &token, json!({})).await.0, 410);
}

/// Issue 12 §7: Stripe's objects pass through whole (an address and a field billsync does not
/// model survive), invoices and payment methods are paged through, and a section Stripe
/// fails is a warning naming it. Stripe is a wiremock server (localstripe has no invoices
/// list paging nor customer payment-method lists).
async fn export_passes_stripe_through_whole(backend: Backend) {
    use wiremock::{
        matchers::{method, path, query_param, query_param_is_missing},
        Mock, MockServer, ResponseTemplate,
    };
    let Some(store) = backend.store("export_passes_stripe_through_whole").await else {
        return;
    };
    let stripe = MockServer::start().await;
    let app = TestApp::spawn(store.store.clone(), &support::test_config(&stripe.uri())).await;
    app.put_user("whole", json!({"email": "whole@example.com"}))
        .await;
    support::link_in_store(app.state.store.as_ref(), "whole", "cus_whole").await;
    let list = |data: Value, more: bool| {
        ResponseTemplate::new(200)
            .set_body_json(json!({"object": "list", "data": data, "has_more": more}))
    };
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_whole"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": "cus_whole", "object": "customer", "email": "whole@example.com",
            "address": {"line1": "1 Main St", "city": "Springfield", "country": "US"},
            "invoice_settings": {"footer": "thanks"}, "tax_exempt": "none",
            "a_field_billsync_does_not_model": {"kept": true}})))
        .mount(&stripe)
        .await;
    // Two pages of invoices.
    Mock::given(method("GET"))
        .and(path("/v1/invoices"))
        .and(query_param("customer", "cus_whole"))
        .and(query_param_is_missing("starting_after"))
        .respond_with(list(
            json!([{"id": "in_1", "object": "invoice", "total": 100}]),
            true,
        ))
        .mount(&stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/invoices"))
        .and(query_param("starting_after", "in_1"))
        .respond_with(list(
            json!([{"id": "in_2", "object": "invoice", "total": 200}]),
            false,
        ))
        .mount(&stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_whole/payment_methods"))
        .and(query_param_is_missing("starting_after"))
        .respond_with(list(
            json!([{"id": "pm_1", "object": "payment_method",
                                   "card": {"last4": "4242"}}]),
            true,
        ))
        .mount(&stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_whole/payment_methods"))
        .and(query_param("starting_after", "pm_1"))
        .respond_with(list(
            json!([{"id": "pm_2", "object": "payment_method"}]),
            false,
        ))
        .mount(&stripe)
        .await;
    // Subscriptions fail (not retried: a 400).
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(
                json!({"error": {"type": "invalid_request_error", "message": "nope"}}),
            ),
        )
        .mount(&stripe)
        .await;

    let token = support::user_token("whole", Some("whole@example.com"), None);
    let export: Value = app
        .as_user(Method::GET, "/api/user/export-data", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let customer = &export["stripe_customer"];
    assert_eq!(customer["address"]["line1"], "1 Main St", "{export}");
    assert_eq!(export["export_version"], "3.0");
    assert_eq!(customer["invoice_settings"]["footer"], "thanks");
    assert_eq!(customer["a_field_billsync_does_not_model"]["kept"], true);
    let ids = |section: &str| {
        export[section]
            .as_array()
            .unwrap_or_else(|| panic!("{section}: {export}"))
            .iter()
            .map(|o| o["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids("stripe_invoices"), ["in_1", "in_2"], "both pages");
    assert_eq!(
        ids("stripe_payment_methods"),
        ["pm_1", "pm_2"],
        "both pages"
    );
    assert_eq!(export["stripe_payment_methods"][0]["card"]["last4"], "4242");
    assert_eq!(export["stripe_subscriptions"], Value::Null);
    assert_eq!(
        export["warnings"],
        json!(["stripe_subscriptions could not be retrieved from Stripe"])
    );
    for section in [
        "user_profile",
        "customer_link",
        "subscriptions",
        "pushed_profile",
        "usage_records",
    ] {
        assert!(export.get(section).is_some(), "{section} missing: {export}");
    }
}

on_every_store!(
    an_erased_person_stays_erased,
    newer_tokens_carry_newer_identity,
    late_echoes_in_order_never_revert_newer_edits,
    late_echoes_reversed_never_revert_newer_edits,
    a_portal_edit_between_two_pushes_is_kept,
    an_admins_email_changes_stay_verified,
    profile_update_reaches_stripe,
    a_burst_of_edits_makes_few_pushes,
    an_edit_during_a_stripe_outage_arrives_later,
    export_contains_every_section,
    erasure_keeps_a_scrubbed_customer_by_default,
    erasure_can_delete_the_customer,
    erasure_during_an_outage_finishes_later,
    portal_needs_a_customer,
    export_passes_stripe_through_whole,
);

/// A server whose Stripe is wiremock: portal sessions are created, and every `GET` answers a
/// body that reads as an empty list and as a customer. `configure` sets the limits under test.
async fn wiremock_app(
    test: &str,
    configure: impl FnOnce(&mut billsync::config::Config),
) -> (support::TestStore, wiremock::MockServer, TestApp) {
    use wiremock::{
        matchers::{method, path},
        Mock, MockServer, ResponseTemplate,
    };
    let store = Backend::Sqlite.store(test).await.expect("sqlite");
    let stripe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/billing_portal/sessions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"id": "bps_1", "object": "billing_portal.session", "url": "https://billing.stripe.com/p/session/1"}),
        ))
        .mount(&stripe)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"id": "cus_any", "object": "list", "data": [], "has_more": false, "metadata": {}}),
        ))
        .mount(&stripe)
        .await;
    let mut config = support::test_config(&stripe.uri());
    configure(&mut config);
    let app = TestApp::spawn(store.store.clone(), &config).await;
    (store, stripe, app)
}

/// A user linked to `customer` (in the store only), and their token.
async fn linked_token(app: &TestApp, user: &str, customer: &str) -> String {
    let email = format!("{user}@example.com");
    app.put_user(user, json!({"email": email})).await;
    support::link_in_store(app.state.store.as_ref(), user, customer).await;
    support::user_token(user, Some(&email), None)
}

/// One user looping on the routes that call Stripe gets 429 `rate_limited` with a
/// `Retry-After` once their bucket is spent, and makes no Stripe call; another user is not
/// affected. The store plays no part in the limits: SQLite only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_routes_that_call_stripe_are_limited_per_user() {
    use billsync::config::Quota;
    use std::time::Duration;
    let (_store, stripe, app) = wiremock_app(
        "the_user_routes_that_call_stripe_are_limited_per_user",
        |c| {
            c.user_limits.portal = Quota {
                burst: 2,
                interval: Duration::from_secs(30),
            };
            c.user_limits.export = Quota {
                burst: 1,
                interval: Duration::from_secs(300),
            };
            c.user_limits.delete = Quota {
                burst: 1,
                interval: Duration::from_secs(60),
            };
        },
    )
    .await;
    let alice = &linked_token(&app, "limited-alice", "cus_alice").await;
    let bob = &linked_token(&app, "limited-bob", "cus_bob").await;
    let call = |method: Method, route: &'static str, token: &String| {
        let request = app.as_user(method, route, token);
        async move { request.send().await.unwrap() }
    };
    let portal = "/api/billing/create-portal-session";
    let export = "/api/user/export-data";
    let assert_limited = |response: reqwest::Response, ceiling: u64| async move {
        assert_eq!(response.status(), 429);
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .expect("whole seconds");
        assert!((1..=ceiling).contains(&retry_after), "{retry_after}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        assert!(body["error"]["message"].is_string());
    };

    for _ in 0..2 {
        assert_eq!(call(Method::POST, portal, alice).await.status(), 200);
    }
    assert_limited(call(Method::POST, portal, alice).await, 30).await;
    assert_limited(call(Method::POST, portal, alice).await, 30).await;
    assert_eq!(
        call(Method::POST, portal, bob).await.status(),
        200,
        "another user's bucket is their own"
    );

    let first = call(Method::GET, export, alice).await;
    assert_eq!(first.status(), 200);
    first.json::<Value>().await.expect("the whole export");
    assert_limited(call(Method::GET, export, alice).await, 300).await;
    let theirs = call(Method::GET, export, bob).await;
    assert_eq!(theirs.status(), 200);
    theirs.json::<Value>().await.unwrap();

    // Account deletion too: a repeat is refused before it can run the saga's Stripe steps.
    let carol = &linked_token(&app, "limited-carol", "cus_carol").await;
    let delete = "/api/user/delete-account";
    let first = call(Method::DELETE, delete, carol).await.status();
    assert!(first == 200 || first == 202, "{first}");
    assert_limited(call(Method::DELETE, delete, carol).await, 60).await;

    // An unsigned request is refused before any bucket: it spends nobody's quota.
    let anonymous = app
        .http
        .post(app.url(portal))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    // The refused requests never reached Stripe: 3 portal sessions were created, not 5.
    let sessions = stripe
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == "/v1/billing_portal/sessions")
        .count();
    assert_eq!(sessions, 3);

    let metrics = app.admin_text("/metrics").await;
    for route in [portal, export, delete] {
        assert!(
            metrics.contains(&format!(
                "billsync_user_rate_limited_total{{route=\"{route}\"}}"
            )),
            "{route} counted"
        );
    }
    let doc = app.public_json("/openapi.json").await;
    for (route, verb) in [(portal, "post"), (export, "get"), (delete, "delete")] {
        let limited = &doc["paths"][route][verb]["responses"]["429"];
        assert!(
            limited["headers"]["Retry-After"].is_object(),
            "{route}: {limited}"
        );
    }
}

/// The user routes' Stripe calls are interactive: with the budget short and background calls
/// queued (made here from a plain task, as the workers make them), a user's portal session
/// reaches Stripe before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_stripe_call_goes_before_queued_background_work() {
    use std::time::Duration;
    let (_store, stripe, app) = wiremock_app(
        "a_users_stripe_call_goes_before_queued_background_work",
        |c| {
            c.stripe.budget_rps = 2;
            c.stripe.max_retries = 0;
            c.stripe.timeout = Duration::from_secs(10);
        },
    )
    .await;
    let token = linked_token(&app, "first-user", "cus_first").await;

    let client = app.state.stripe.clone();
    let mut background = Vec::new();
    for i in 0..4 {
        let client_ = client.clone();
        background.push(tokio::spawn(async move {
            client_.retrieve_customer(&format!("cus_bg{i}")).await
        }));
        // In line one at a time (the first has the idle budget's permit at once).
        while (client.attempts_sent() as usize) + client.waiting_for_budget() < i + 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let response = app
        .as_user(Method::POST, "/api/billing/create-portal-session", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for call in background {
        call.await.unwrap().unwrap();
    }
    let order: Vec<String> = stripe
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| r.url.path().to_owned())
        .collect();
    assert_eq!(
        order,
        [
            "/v1/customers/cus_bg0",
            "/v1/billing_portal/sessions",
            "/v1/customers/cus_bg1",
            "/v1/customers/cus_bg2",
            "/v1/customers/cus_bg3",
        ]
    );
}
