//! Every request billsync sends, held against the parameters Stripe publishes for the pinned
//! API version (`tests/fixtures/stripe-requests.json`, from the official `stripe` npm package):
//! billsync's own flows run against a stand-in that refuses what Stripe would refuse, and the
//! operations they reached must be every operation the client can send.

use std::collections::BTreeSet;

use billsync::{
    config::DEFAULT_STRIPE_API_VERSION,
    portal_config::{self, Applied, PortalSpec},
    stripe::{CustomerList, CustomerParams, StripeClient},
    stripe_setup,
};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{
    self, eventually,
    stripe_standin::{Rules, StripeStandIn},
    TestApp,
};

/// The operations named in the client's source: each string literal shaped like
/// `customers.create`. A new operation fails this test until the snapshot covers it and a
/// flow below sends it.
fn operations_in_client_source() -> BTreeSet<String> {
    let source = include_str!("../../../src/stripe/mod.rs");
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.contains('.')
                && !s.starts_with('.')
                && !s.ends_with('.')
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
        })
        .map(str::to_owned)
        .collect()
}

fn user_event(id: &str, kind: &str, created: i64, object: Value) -> String {
    json!({"id": id, "object": "event", "type": kind, "created": created, "livemode": false,
           "api_version": DEFAULT_STRIPE_API_VERSION, "data": {"object": object}})
    .to_string()
}

#[test]
fn the_snapshot_is_the_pinned_version() {
    assert_eq!(Rules::pinned().api_version, DEFAULT_STRIPE_API_VERSION);
}

#[test]
fn the_rules_refuse_what_stripe_refuses() {
    let rules = Rules::pinned();
    let pairs = |text: &str| -> Vec<(String, String)> { serde_urlencoded::from_str(text).unwrap() };
    let refused = |method: &str, path: &str, form: &str| {
        let v = rules
            .check(method, path, &pairs(form))
            .expect_err(&format!("{method} {path} {form} must be refused"));
        (v.code, v.param)
    };
    assert_eq!(
        refused("POST", "/v1/customers", "emial=a%40b.c"),
        ("parameter_unknown", "emial".into())
    );
    assert_eq!(
        refused(
            "POST",
            "/v1/billing_portal/configurations",
            "features[subscription_cancel][enabled]=true\
             &features[subscription_cancel][cancellation_reason][enabled]=false"
        ),
        (
            "parameter_missing",
            "features[subscription_cancel][cancellation_reason][options]".into()
        )
    );
    assert_eq!(
        refused(
            "POST",
            "/v1/billing_portal/configurations",
            "business_profile[headline]=x"
        ),
        ("parameter_missing", "features".into())
    );
    assert_eq!(
        refused("GET", "/v1/subscriptions", "status=everything"),
        ("parameter_invalid_string", "status".into())
    );
    assert_eq!(
        refused(
            "POST",
            "/v1/billing_portal/configurations",
            "features[invoice_history][enabled]=yes"
        ),
        (
            "parameter_invalid_boolean",
            "features[invoice_history][enabled]".into()
        )
    );
    assert_eq!(
        refused("GET", "/v1/customers", "limit=ten"),
        ("parameter_invalid_integer", "limit".into())
    );
    assert_eq!(
        refused(
            "POST",
            "/v1/billing_portal/configurations/bpc_1",
            "features[customer_update][allowed_updates][1]=email"
        ),
        (
            "parameter_invalid",
            "features[customer_update][allowed_updates]".into()
        )
    );
    assert_eq!(
        refused("GET", "/v1/customer", ""),
        ("resource_missing", "/v1/customer".into())
    );
    assert_eq!(
        refused("PATCH", "/v1/customers/cus_1", "name=x").0,
        "resource_missing"
    );
    // What Stripe accepts: '' unsets an emptyable field, a metadata key, or a string.
    for (method, path, form, operation) in [
        (
            "POST",
            "/v1/customers/cus_1",
            "address=&shipping=&email=&metadata[userId]=",
            "customers.update",
        ),
        (
            "GET",
            "/v1/customers/search",
            "query=email%3A%22a%40b.c%22&limit=100&page=p1",
            "customers.search",
        ),
        (
            "POST",
            "/v1/billing_portal/configurations/bpc_1",
            "features[customer_update][allowed_updates]=&business_profile[headline]=",
            "billing_portal.configurations.update",
        ),
        (
            "DELETE",
            "/v1/subscriptions/sub_1",
            "",
            "subscriptions.cancel",
        ),
    ] {
        assert_eq!(
            rules.check(method, path, &pairs(form)),
            Ok(operation),
            "{method} {path} {form}"
        );
    }
}

/// A portal configuration with everything optional switched off: basil still requires the
/// reason options (as `''`).
const PORTAL_MINIMAL: &str = r#"
name = "minimal"
[business_profile]
[features.invoice_history]
enabled = true
[features.subscription_cancel]
enabled = false
[features.subscription_cancel.cancellation_reason]
enabled = false
"#;

#[tokio::test]
async fn every_request_billsync_sends_is_one_stripe_accepts() {
    let (server, stripe) = StripeStandIn::start().await;
    let store = support::sqlite_store().await;
    let config = support::test_config(&server.uri());
    let app = TestApp::spawn(store.store.clone(), &config).await;
    let client = StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap()).unwrap();

    // Resolve (list by email, search, create), then a profile push (update).
    let user = "conformance-user";
    app.put_user(
        user,
        json!({"email": "Ada@Example.com", "first_name": "Ada", "last_name": "Lovelace"}),
    )
    .await;
    let (status, resolved) = app.resolve(user).await;
    assert_eq!(status, 200, "{resolved} {:?}", stripe.refused());
    let customer = resolved["customer_id"].as_str().unwrap().to_owned();
    app.put_user(
        user,
        json!({"email": "ada@example.com", "first_name": "Augusta", "phone": "+14155550100"}),
    )
    .await;
    eventually(10, "the profile push reached the stand-in", || async {
        stripe
            .seen()
            .iter()
            .any(|s| s.operation == "customers.update")
            .then_some(())
    })
    .await;

    // Webhooks the applier settles (re-fetching where it must).
    let subscription = stripe.add_subscription(&customer, "active");
    app.deliver_webhook(&user_event(
        "evt_conf_sub",
        "customer.subscription.created",
        1_700_000_100,
        subscription.clone(),
    ))
    .await;
    // The same second again: the applier asks Stripe for the subscription's current state.
    app.deliver_webhook(&user_event(
        "evt_conf_sub_tie",
        "customer.subscription.updated",
        1_700_000_100,
        subscription.clone(),
    ))
    .await;
    let edited = json!({"id": customer, "object": "customer", "email": "ada@example.com",
                        "name": "Ada Portal", "phone": null, "metadata": {"userId": user},
                        "livemode": false});
    app.deliver_webhook(&user_event(
        "evt_conf_cus",
        "customer.updated",
        1_700_000_200,
        edited,
    ))
    .await;
    app.events_settled().await;

    // The user routes: portal sessions (each flow), the export.
    let token = support::user_token(user, Some("ada@example.com"), Some(json!(true)));
    for flow in [
        None,
        Some("payment_method_update"),
        Some("subscription_cancel"),
        Some("subscription_update"),
    ] {
        let body = flow.map_or(json!({}), |f| json!({"flow": f}));
        let response = app
            .as_user(Method::POST, "/api/billing/create-portal-session", &token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{flow:?}: {:?}", stripe.refused());
    }
    let export = app
        .as_user(Method::GET, "/api/user/export-data", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 200, "{:?}", stripe.refused());

    // Reconcile over the whole account.
    let id = app.start_reconcile().await;
    let done = app.reconcile_finished(&id).await;
    assert_eq!(done["run"]["status"], "done", "{done}");

    // The portal configuration as code: created, updated, read back; and a minimal one.
    let example = PortalSpec::parse(include_str!("../../../portal.example.toml")).unwrap();
    let created = portal_config::apply(store.store.as_ref(), &client, &example)
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", stripe.refused()));
    assert!(matches!(created, Applied::Created { .. }), "{created:?}");
    let mut changed = example.clone();
    changed.business_profile.headline = Some("Billing".into());
    let updated = portal_config::apply(store.store.as_ref(), &client, &changed)
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", stripe.refused()));
    assert!(matches!(updated, Applied::Updated { .. }), "{updated:?}");
    client
        .retrieve_portal_configuration(updated.id())
        .await
        .unwrap();
    let minimal = PortalSpec::parse(PORTAL_MINIMAL).unwrap();
    portal_config::apply(store.store.as_ref(), &client, &minimal)
        .await
        .unwrap_or_else(|e| panic!("minimal portal: {e}: {:?}", stripe.refused()));

    // The plans file against Stripe: ids retrieved, lookup keys listed ten at a time.
    stripe.add_price("price_conf_pro", Some("pro_monthly"), true);
    stripe.add_price("price_conf_old", None, false);
    for i in 0..11 {
        stripe.add_price(
            &format!("price_conf_k{i}"),
            Some(&format!("key{i}")),
            i != 3,
        );
    }
    let mut prices = vec![
        "\"price_conf_pro\"".to_owned(),
        "\"price_conf_old\"".into(),
        "\"price_conf_gone\"".into(),
    ];
    prices.extend((0..12).map(|i| format!("\"lookup:key{i}\"")));
    let plans = billsync::plans::Plans::parse(&format!(
        "[[plans]]\nid = \"pro\"\nprices = [{}]\n",
        prices.join(", ")
    ))
    .unwrap();
    let findings = billsync::cli::plans::check(&plans, &client)
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", stripe.refused()));
    let problems: Vec<(String, String)> =
        findings.into_iter().map(|f| (f.price, f.problem)).collect();
    assert_eq!(
        problems,
        [
            ("price_conf_old", "archived in Stripe (active is false)"),
            ("price_conf_gone", "no such price in Stripe"),
            ("lookup:key11", "no active price has this lookup key"),
            ("lookup:key3", "no active price has this lookup key"),
        ]
        .map(|(p, m)| (p.to_owned(), m.to_owned()))
    );
    let lists = stripe
        .seen()
        .into_iter()
        .filter(|s| s.operation == "prices.list")
        .count();
    assert_eq!(lists, 2, "12 lookup keys, 10 per list");

    // Paging: more than a page of customers, of search results, of a customer's subscriptions.
    for _ in 0..101 {
        stripe.add_customer("many@example.com", json!({"userId": "many"}));
    }
    assert_eq!(
        client
            .customers_by_email("many@example.com")
            .await
            .unwrap()
            .len(),
        101
    );
    let page = client.list_customers(None, 2, None).await.unwrap();
    client
        .list_customers(None, 2, Some(&page.data[1].id))
        .await
        .unwrap();
    let found = client
        .search_customers(r#"metadata["userId"]:"many""#)
        .await
        .unwrap();
    assert_eq!(found.map(|f| f.len()), Some(101));
    let busy = stripe.add_customer("busy@example.com", json!({}));
    for _ in 0..101 {
        stripe.add_subscription(&busy, "active");
    }
    assert_eq!(client.list_subscriptions(&busy).await.unwrap().len(), 101);
    for list in [
        CustomerList::Subscriptions,
        CustomerList::Invoices,
        CustomerList::PaymentMethods,
    ] {
        client.customer_objects(&busy, list).await.unwrap();
    }
    client
        .update_customer(
            &busy,
            &CustomerParams {
                name: Some(String::new()),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();

    // Erasure, keeping the customer (scrub) and deleting another's (cancel, delete).
    let response = app
        .as_user(Method::DELETE, "/api/user/delete-account", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", stripe.refused());
    let second = "conformance-second";
    app.put_user(second, json!({"email": "second@example.com"}))
        .await;
    let (status, resolved) = app.resolve(second).await;
    assert_eq!(status, 200, "{resolved}");
    let second_customer = resolved["customer_id"].as_str().unwrap().to_owned();
    let second_sub = stripe.add_subscription(&second_customer, "active");
    app.deliver_webhook(&user_event(
        "evt_conf_sub2",
        "customer.subscription.created",
        1_700_000_300,
        second_sub,
    ))
    .await;
    app.events_settled().await;
    let token = support::user_token(second, Some("second@example.com"), Some(json!(true)));
    let response = app
        .as_user(Method::DELETE, "/api/user/delete-account", &token)
        .json(&json!({"deleteFromStripe": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", stripe.refused());

    // `billsync stripe setup`: an endpoint created, and one drifted in the Dashboard fixed.
    let url = "https://app.example.com/api/webhooks/stripe";
    let created = stripe_setup::setup(&client, url, DEFAULT_STRIPE_API_VERSION)
        .await
        .unwrap();
    assert!(matches!(created, stripe_setup::Outcome::Created { .. }));
    let drifted = "https://app.example.com/old/webhooks";
    stripe.add_webhook_endpoint(
        drifted,
        &["customer.updated"],
        Some(DEFAULT_STRIPE_API_VERSION),
        "disabled",
    );
    let updated = stripe_setup::setup(&client, drifted, DEFAULT_STRIPE_API_VERSION)
        .await
        .unwrap();
    assert!(matches!(updated, stripe_setup::Outcome::Updated { .. }));

    let refused = stripe.refused();
    assert!(
        refused.is_empty(),
        "Stripe would refuse these requests:\n{}",
        refused.join("\n")
    );
    let sent: BTreeSet<String> = stripe.seen().into_iter().map(|s| s.operation).collect();
    let published = stripe.rules().operation_names();
    let named = operations_in_client_source();
    let unpublished: Vec<_> = named.difference(&published).collect();
    assert!(
        unpublished.is_empty(),
        "operations the client names but the snapshot lacks (add them to \
         scripts/stripe-conformance/generate.mjs): {unpublished:?}"
    );
    let unexercised: Vec<_> = named.difference(&sent).collect();
    assert!(
        unexercised.is_empty(),
        "operations the client can send that no flow here sent: {unexercised:?}"
    );
    // Each page after the first asked for its cursor, as Stripe pages.
    let params_of = |operation: &str, name: &str| {
        stripe
            .seen()
            .iter()
            .filter(|s| s.operation == operation)
            .any(|s| s.params.iter().any(|(k, _)| k == name))
    };
    assert!(params_of("customers.list", "starting_after"));
    assert!(params_of("subscriptions.list", "starting_after"));
    assert!(params_of("customers.search", "page"));
}
