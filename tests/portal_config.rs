//! The billing-portal configuration as code, against a wiremock Stripe: the exact form fields
//! Stripe documents on create and update, no call at all for an unchanged file, and validation
//! that names the key before anything is sent.

mod support;

use std::process::Command;

use billsync::portal_config::{apply, Applied, PortalSpec};
use serde_json::json;
use support::Backend;
use wiremock::{
    matchers::{header_exists, method, path},
    Mock, MockServer, ResponseTemplate,
};

const EXAMPLE: &str = include_str!("../portal.example.toml");

fn form(request: &wiremock::Request) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&request.body).unwrap();
    pairs.sort();
    pairs
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    pairs.sort();
    pairs
}

fn example_fields(headline: &str) -> Vec<(String, String)> {
    pairs(&[
        ("business_profile[headline]", headline),
        ("features[payment_method_update][enabled]", "true"),
        ("features[invoice_history][enabled]", "true"),
        ("features[customer_update][enabled]", "true"),
        ("features[customer_update][allowed_updates][0]", "email"),
        ("features[customer_update][allowed_updates][1]", "name"),
        ("features[customer_update][allowed_updates][2]", "phone"),
        ("features[customer_update][allowed_updates][3]", "address"),
        ("features[customer_update][allowed_updates][4]", "tax_id"),
        ("features[subscription_cancel][enabled]", "true"),
        ("features[subscription_cancel][mode]", "at_period_end"),
        (
            "features[subscription_cancel][cancellation_reason][enabled]",
            "true",
        ),
        (
            "features[subscription_cancel][cancellation_reason][options][0]",
            "too_expensive",
        ),
        (
            "features[subscription_cancel][cancellation_reason][options][1]",
            "missing_features",
        ),
        (
            "features[subscription_cancel][cancellation_reason][options][2]",
            "switched_service",
        ),
        (
            "features[subscription_cancel][cancellation_reason][options][3]",
            "unused",
        ),
        (
            "features[subscription_cancel][cancellation_reason][options][4]",
            "other",
        ),
        ("features[subscription_update][enabled]", "true"),
        (
            "features[subscription_update][default_allowed_updates][0]",
            "price",
        ),
        (
            "features[subscription_update][proration_behavior]",
            "create_prorations",
        ),
        ("metadata[billsync_name]", "default"),
    ])
}

async fn create_update_and_no_op(backend: Backend) {
    let Some(store) = backend.store("portal_create_update_and_no_op").await else {
        return;
    };
    let stripe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/billing_portal/configurations"))
        .and(header_exists("idempotency-key"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"id": "bpc_test1", "object": "billing_portal.configuration", "active": true}),
        ))
        .expect(1)
        .mount(&stripe)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/billing_portal/configurations/bpc_test1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"id": "bpc_test1", "object": "billing_portal.configuration", "active": true}),
        ))
        .expect(1)
        .mount(&stripe)
        .await;
    let config = support::test_config(&stripe.uri());
    let client =
        billsync::stripe::StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap())
            .unwrap();
    let store = store.store.as_ref();

    let spec = PortalSpec::parse(EXAMPLE).unwrap();
    assert_eq!(
        apply(store, &client, &spec).await.unwrap(),
        Applied::Created {
            id: "bpc_test1".into()
        }
    );
    let requests = stripe.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        form(&requests[0]),
        example_fields("Manage your subscription and billing details")
    );
    let recorded = store.portal_config("default").await.unwrap().unwrap();
    assert_eq!(recorded.stripe_configuration_id, "bpc_test1");

    // Unchanged: no Stripe call at all.
    assert_eq!(
        apply(store, &client, &spec).await.unwrap(),
        Applied::Unchanged {
            id: "bpc_test1".into()
        }
    );
    assert_eq!(stripe.received_requests().await.unwrap().len(), 1);

    // Changed: updated in place, with the whole configuration.
    let changed = PortalSpec::parse(&EXAMPLE.replace(
        "headline = \"Manage your subscription and billing details\"",
        "headline = \"Your plan and invoices\"",
    ))
    .unwrap();
    assert_eq!(
        apply(store, &client, &changed).await.unwrap(),
        Applied::Updated {
            id: "bpc_test1".into()
        }
    );
    let requests = stripe.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    assert_eq!(form(&requests[1]), example_fields("Your plan and invoices"));
    assert!(
        requests[1].headers.get("idempotency-key").is_some(),
        "every POST carries a key"
    );
    assert_ne!(
        store
            .portal_config("default")
            .await
            .unwrap()
            .unwrap()
            .spec_hash,
        recorded.spec_hash
    );
    assert_eq!(
        apply(store, &client, &changed).await.unwrap(),
        Applied::Unchanged {
            id: "bpc_test1".into()
        }
    );
    assert_eq!(stripe.received_requests().await.unwrap().len(), 2);
}

on_every_store!(create_update_and_no_op);

fn rejected(text: &str) -> String {
    PortalSpec::parse(text)
        .expect_err("must be rejected")
        .to_string()
}

#[test]
fn invalid_files_are_refused_naming_the_key() {
    let cases: [(&str, &str, &str); 9] = [
        (
            "[features.subscription_cancel]\nenabled = true",
            "[features.subscription_cancel]\nenabled = true\nproration_behavior = \"create_prorations\"",
            "features.subscription_cancel.proration_behavior",
        ),
        (
            "[features.subscription_cancel]\nenabled = true",
            "[features.subscription_cancel]\nenabled = true\nproration_behavior = \"always_invoice\"",
            "features.subscription_cancel.proration_behavior",
        ),
        (
            "mode = \"at_period_end\"",
            "mode = \"whenever\"",
            "features.subscription_cancel.mode",
        ),
        (
            "options = [\"too_expensive\", \"missing_features\", \"switched_service\", \"unused\", \"other\"]",
            "options = []",
            "features.subscription_cancel.cancellation_reason.options",
        ),
        (
            "options = [\"too_expensive\", \"missing_features\", \"switched_service\", \"unused\", \"other\"]",
            "options = [\"too_expensive\", \"bored\"]",
            "features.subscription_cancel.cancellation_reason.options[1]",
        ),
        (
            "allowed_updates = [\"email\", \"name\", \"phone\", \"address\", \"tax_id\"]",
            "allowed_updates = []",
            "features.customer_update.allowed_updates",
        ),
        (
            "default_allowed_updates = [\"price\"]",
            "default_allowed_updates = []",
            "features.subscription_update.default_allowed_updates",
        ),
        (
            "proration_behavior = \"create_prorations\"",
            "proration_behavior = \"sometimes\"",
            "features.subscription_update.proration_behavior",
        ),
        (
            "[features.invoice_history]\nenabled = true",
            "[features.invoice_history]\nenabled = true\nshow_amounts = true",
            "show_amounts",
        ),
    ];
    for (from, to, key) in cases {
        assert!(EXAMPLE.contains(from), "{from}");
        let error = rejected(&EXAMPLE.replacen(from, to, 1));
        assert!(error.contains(key), "{key} not named in: {error}");
    }
    // Immediate cancellation may prorate.
    PortalSpec::parse(&EXAMPLE.replace(
        "mode = \"at_period_end\"",
        "mode = \"immediately\"\nproration_behavior = \"create_prorations\"",
    ))
    .unwrap();
    // An unknown feature, and a spec key Stripe no longer takes, are named too.
    let error = rejected(&format!(
        "{EXAMPLE}\n[features.subscription_pause]\nenabled = false\n"
    ));
    assert!(error.contains("subscription_pause"), "{error}");
}

/// The CLI: an invalid file stops before Stripe; a valid one prints what it did; `show`
/// prints the record and Stripe's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_validates_then_applies_and_shows() {
    let stripe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/billing_portal/configurations"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"id": "bpc_cli", "active": true})),
        )
        .mount(&stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/billing_portal/configurations/bpc_cli"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"id": "bpc_cli", "active": true, "business_profile": {"headline": "From Stripe"}}),
        ))
        .mount(&stripe)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, EXAMPLE.replace("options = [\"too_expensive\", \"missing_features\", \"switched_service\", \"unused\", \"other\"]", "options = []")).unwrap();
    let good = dir.path().join("portal.toml");
    std::fs::write(&good, EXAMPLE).unwrap();
    let database = format!("sqlite://{}", dir.path().join("b.db").display());
    let billsync = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_billsync"))
            .args(args)
            .env("DATABASE_URL", &database)
            .env("STRIPE_SECRET_KEY", support::STRIPE_KEY)
            .env("BILLSYNC_STRIPE_API_BASE", stripe.uri())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(|| billsync(&["portal", "apply", bad.to_str().unwrap()]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("features.subscription_cancel.cancellation_reason.options"),
        "{stderr}"
    );
    assert!(stripe.received_requests().await.unwrap().is_empty());

    let out =
        tokio::task::block_in_place(|| billsync(&["portal", "apply", good.to_str().unwrap()]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"action":"created","id":"bpc_cli"}"#
    );
    let out =
        tokio::task::block_in_place(|| billsync(&["portal", "apply", good.to_str().unwrap()]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"action":"unchanged","id":"bpc_cli"}"#
    );
    let out = tokio::task::block_in_place(|| billsync(&["portal", "show"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["id"], "bpc_cli");
    assert_eq!(
        shown["stripe"]["business_profile"]["headline"],
        "From Stripe"
    );
    let out = tokio::task::block_in_place(|| billsync(&["portal", "show", "--name", "other"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"other\""));
}
