//! `billsync stripe setup` against the stand-in, which answers as Stripe documents and refuses
//! what Stripe would refuse (parameters of the pinned version's published definitions).

use billsync::{
    config::DEFAULT_STRIPE_API_VERSION,
    stripe::StripeClient,
    stripe_setup::{self, Drift, Outcome, SetupError},
    webhooks::ingest::HANDLED_TYPES,
};
use serde_json::{json, Value};

use crate::support::{self, stripe_standin::StripeStandIn};

const URL: &str = "https://app.example.com/api/webhooks/stripe";

async fn standin() -> (wiremock::MockServer, StripeStandIn, StripeClient) {
    let (server, stripe) = StripeStandIn::start().await;
    let config = support::test_config(&server.uri());
    let client = StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap()).unwrap();
    (server, stripe, client)
}

/// `stripe setup` for `url`, at billsync's pinned version.
async fn setup_at(client: &StripeClient, url: &str) -> Result<Outcome, SetupError> {
    stripe_setup::setup(client, url, DEFAULT_STRIPE_API_VERSION).await
}

/// `stripe setup --check` for [`URL`], at billsync's pinned version.
async fn check(client: &StripeClient) -> Option<(String, Drift)> {
    stripe_setup::check(client, URL, DEFAULT_STRIPE_API_VERSION)
        .await
        .unwrap()
}

/// How many requests of `operation` the stand-in accepted.
fn count_of(stripe: &StripeStandIn, operation: &str) -> usize {
    operations(stripe)
        .iter()
        .filter(|o| *o == operation)
        .count()
}

/// The operations the stand-in accepted, in order.
fn operations(stripe: &StripeStandIn) -> Vec<String> {
    stripe.seen().into_iter().map(|s| s.operation).collect()
}

/// The form pairs of the one accepted request of `operation`.
fn params_of(stripe: &StripeStandIn, operation: &str) -> Vec<(String, String)> {
    let seen: Vec<_> = stripe
        .seen()
        .into_iter()
        .filter(|s| s.operation == operation)
        .collect();
    assert_eq!(seen.len(), 1, "one {operation}");
    seen[0].params.clone()
}

fn handled_events_as_form() -> Vec<(String, String)> {
    HANDLED_TYPES
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("enabled_events[{i}]"), (*t).to_owned()))
        .collect()
}

#[tokio::test]
async fn setup_creates_the_endpoint_once_with_the_handled_events_and_the_pinned_version() {
    let (_server, stripe, client) = standin().await;
    let outcome = setup_at(&client, URL).await.unwrap();
    let Outcome::Created { id, secret } = outcome else {
        panic!("created, not {outcome:?}");
    };
    assert!(stripe.refused().is_empty(), "{:?}", stripe.refused());
    assert_eq!(
        secret
            .expect("the create's answer carries the secret")
            .expose(),
        format!("whsec_{}", id.trim_start_matches("we_"))
    );
    let mut expected = vec![("url".to_owned(), URL.to_owned())];
    expected.extend(handled_events_as_form());
    expected.push(("api_version".into(), DEFAULT_STRIPE_API_VERSION.into()));
    expected.push(("description".into(), "billsync".into()));
    let mut sent = params_of(&stripe, "webhook_endpoints.create");
    sent.sort();
    expected.sort();
    assert_eq!(sent, expected);
    let held = stripe.webhook_endpoint(&id).unwrap();
    assert_eq!(held["enabled_events"], json!(HANDLED_TYPES));
    assert_eq!(held["api_version"], DEFAULT_STRIPE_API_VERSION);

    // Again: found by its URL, in sync, nothing created or changed.
    let again = setup_at(&client, URL).await.unwrap();
    assert!(
        matches!(&again, Outcome::InSync { id: found } if *found == id),
        "{again:?}"
    );
    assert_eq!(
        operations(&stripe),
        [
            "webhook_endpoints.list",
            "webhook_endpoints.create",
            "webhook_endpoints.list"
        ]
    );
    let checked = check(&client).await;
    assert_eq!(checked, Some((id, Drift::default())));
}

#[tokio::test]
async fn setup_finds_its_url_exactly_among_many_and_fixes_events_and_status() {
    let (_server, stripe, client) = standin().await;
    // The drifted endpoint and one whose path differs in case (another URL to the receiving
    // app) first, then more than a page of others: newest first, they are on the second page.
    let other_case = stripe.add_webhook_endpoint(
        "https://app.example.com/API/webhooks/stripe",
        &["*"],
        None,
        "enabled",
    );
    let drifted = stripe.add_webhook_endpoint(
        "https://APP.Example.com:443/api/webhooks/stripe",
        &["customer.updated", "invoice.paid"],
        Some(DEFAULT_STRIPE_API_VERSION),
        "disabled",
    );
    for i in 0..105 {
        stripe.add_webhook_endpoint(
            &format!("https://other{i}.example.com/hook"),
            &["invoice.paid"],
            None,
            "enabled",
        );
    }
    let expected_drift = Drift {
        missing_events: vec![
            "customer.created".into(),
            "customer.deleted".into(),
            "customer.subscription.created".into(),
            "customer.subscription.deleted".into(),
            "customer.subscription.updated".into(),
        ],
        extra_events: vec!["invoice.paid".into()],
        api_version: None,
        disabled: true,
    };
    let checked = check(&client).await;
    assert_eq!(checked, Some((drifted.clone(), expected_drift.clone())));
    assert_eq!(
        count_of(&stripe, "webhook_endpoints.list"),
        2,
        "107 endpoints are two pages of 100"
    );

    let outcome = setup_at(&client, URL).await.unwrap();
    let Outcome::Updated { id, fixed } = outcome else {
        panic!("updated, not {outcome:?}");
    };
    assert_eq!((id.as_str(), &fixed), (drifted.as_str(), &expected_drift));
    assert!(stripe.refused().is_empty(), "{:?}", stripe.refused());
    let mut expected = handled_events_as_form();
    expected.push(("disabled".into(), "false".into()));
    let mut sent = params_of(&stripe, "webhook_endpoints.update");
    sent.sort();
    expected.sort();
    assert_eq!(sent, expected);
    let held = stripe.webhook_endpoint(&drifted).unwrap();
    assert_eq!(held["enabled_events"], json!(HANDLED_TYPES));
    assert_eq!(held["status"], "enabled");
    // Nothing else was touched, nothing created.
    assert_eq!(
        stripe.webhook_endpoint(&other_case).unwrap()["enabled_events"],
        json!(["*"])
    );
    assert_eq!(count_of(&stripe, "webhook_endpoints.create"), 0);
    let checked = check(&client).await;
    assert_eq!(checked, Some((drifted, Drift::default())));
}

#[tokio::test]
async fn an_endpoint_on_another_api_version_is_reported_and_left_alone() {
    let (_server, stripe, client) = standin().await;
    let old = stripe.add_webhook_endpoint(URL, &HANDLED_TYPES, Some("2024-06-20"), "enabled");
    let checked = check(&client).await;
    assert_eq!(
        checked,
        Some((
            old.clone(),
            Drift {
                api_version: Some("2024-06-20".into()),
                ..Drift::default()
            }
        ))
    );
    let err = setup_at(&client, URL).await.unwrap_err();
    assert!(
        matches!(&err, SetupError::ApiVersion { id, have, .. }
        if *id == old && have == "2024-06-20"),
        "{err:?}"
    );
    assert!(err.to_string().contains("create a new endpoint"), "{err}");
    assert_eq!(operations(&stripe), ["webhook_endpoints.list"; 2]);
    // An endpoint on the account's default version is not billsync's pinned one either.
    let (_server, stripe, client) = standin().await;
    stripe.add_webhook_endpoint(URL, &HANDLED_TYPES, None, "enabled");
    let err = setup_at(&client, URL).await.unwrap_err();
    assert!(err.to_string().contains("account default"), "{err}");
}

#[tokio::test]
async fn two_endpoints_at_the_url_or_a_bad_url_stop_setup_before_any_change() {
    let (_server, stripe, client) = standin().await;
    let first = stripe.add_webhook_endpoint(URL, &HANDLED_TYPES, None, "enabled");
    let second = stripe.add_webhook_endpoint(URL, &["*"], None, "enabled");
    let err = setup_at(&client, URL).await.unwrap_err();
    assert!(
        matches!(&err, SetupError::SeveralEndpoints(ids) if *ids == vec![second.clone(), first.clone()]),
        "{err:?}"
    );
    for bad in [
        "app.example.com/hook",
        "ftp://app.example.com/hook",
        "https://",
    ] {
        let err = setup_at(&client, bad).await.unwrap_err();
        assert!(matches!(err, SetupError::BadUrl(_)), "{bad}: {err:?}");
    }
    assert_eq!(operations(&stripe), ["webhook_endpoints.list"]);
    let untouched: Value = stripe.webhook_endpoint(&second).unwrap();
    assert_eq!(untouched["enabled_events"], json!(["*"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_prints_the_secret_once_and_check_fails_on_drift() {
    let (server, stripe, _client) = standin().await;
    let billsync = |args: &[&str]| {
        let out = tokio::task::block_in_place(|| {
            std::process::Command::new(env!("CARGO_BIN_EXE_billsync"))
                .args(args)
                .env("STRIPE_SECRET_KEY", support::STRIPE_KEY)
                .env("BILLSYNC_STRIPE_API_BASE", server.uri())
                .env("RUST_LOG", "debug")
                .output()
                .unwrap()
        });
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, stderr) = billsync(&["stripe", "setup", "--check", "--url", URL]);
    assert!(!ok);
    assert!(
        stderr.contains("no webhook endpoint has the URL"),
        "{stderr}"
    );

    let (ok, stdout, stderr) = billsync(&["stripe", "setup", "--url", URL]);
    assert!(ok, "{stderr}");
    assert_eq!(count_of(&stripe, "webhook_endpoints.create"), 1);
    let secret = stdout
        .lines()
        .find(|l| l.starts_with("whsec_"))
        .unwrap_or_else(|| panic!("the secret on stdout: {stdout}"));
    assert!(stdout.contains("STRIPE_WEBHOOK_SECRET"), "{stdout}");
    assert!(
        !stderr.contains(secret),
        "the secret reached the logs: {stderr}"
    );

    let (ok, stdout, _) = billsync(&["stripe", "setup", "--url", URL]);
    assert!(ok);
    assert!(stdout.contains("already as billsync needs it"), "{stdout}");
    assert!(!stdout.contains("whsec_"), "{stdout}");
    let (ok, stdout, _) = billsync(&["stripe", "setup", "--check", "--url", URL]);
    assert!(ok, "{stdout}");
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["in_sync"], true, "{stdout}");
    assert!(
        report["id"].as_str().unwrap().starts_with("we_"),
        "{stdout}"
    );
    stripe.add_webhook_endpoint(
        "https://app.example.com/other",
        &["invoice.paid"],
        Some(DEFAULT_STRIPE_API_VERSION),
        "disabled",
    );
    let (ok, stdout, stderr) = billsync(&[
        "stripe",
        "setup",
        "--check",
        "--url",
        "https://app.example.com/other",
    ]);
    assert!(!ok, "{stdout}");
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["in_sync"], false, "{stdout}");
    assert!(
        stderr.contains("missing events customer.created")
            && stderr.contains("extra events invoice.paid")
            && stderr.contains("disabled"),
        "{stderr}"
    );
}
