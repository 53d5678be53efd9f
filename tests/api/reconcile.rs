//! Reconciliation against a localstripe of its own (it must see every customer), on both
//! stores: a seeded world with every category (3 of each, 500 listed customers in all) is
//! counted exactly; `--apply` fixes what is safe and deletes nothing; a second run finds only
//! `ok`, `orphan` and `duplicate`. Then the CLI and the admin API on the same world.

use crate::support;

use std::{process::Command, sync::Arc};

use billsync::{
    domain::{Email, PersonName, UserId},
    reconcile::{self, Category, RateLimiter, Report},
    store::{Store, UserUpsert},
    stripe::StripeClient,
};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;
use support::{eventually, Backend, LocalStripe, TestApp};

const OK: usize = 488;
const EACH: usize = 3;

fn user(id: &str, first: &str, last: &str) -> UserUpsert {
    UserUpsert {
        id: UserId::parse(id).unwrap(),
        email: Email::parse(&format!("{id}@example.com")).unwrap(),
        email_verified: true,
        first_name: PersonName::parse_optional(Some(first), "first_name").unwrap(),
        last_name: PersonName::parse_optional(Some(last), "last_name").unwrap(),
        phone: None,
    }
}

/// Creates the customers (8 at a time) and returns their ids, in the order given.
async fn create_customers(
    stripe: &LocalStripe,
    specs: Vec<(String, String, String)>,
) -> Vec<String> {
    let ids: Vec<(usize, String)> = futures_util::stream::iter(specs.into_iter().enumerate())
        .map(|(i, (email, name, user_id))| async move {
            let mut form = vec![("email", email.as_str()), ("name", name.as_str())];
            if !user_id.is_empty() {
                form.push(("metadata[userId]", user_id.as_str()));
            }
            let created = stripe.create_customer(&form).await;
            (i, created["id"].as_str().unwrap().to_owned())
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut ids = ids;
    ids.sort();
    ids.into_iter().map(|(_, id)| id).collect()
}

async fn link(store: &dyn Store, user: &str, customer: &str) {
    support::link_in_store(store, user, customer).await;
}

/// users ok-0..487 (linked, in agreement), drift-0..2 (linked, local name differs),
/// match-0..2 (unlinked; a customer names them), dangling-0..2 (linked to deleted customers);
/// customers naming ghosts (orphans) and second customers of ok-0..2 (duplicates).
async fn seed(store: &dyn Store, stripe: &LocalStripe) {
    let mut specs = Vec::new();
    for i in 0..OK {
        specs.push((
            format!("ok-{i}@example.com"),
            format!("Ok{i} User"),
            format!("ok-{i}"),
        ));
    }
    for i in 0..EACH {
        specs.push((
            format!("drift-{i}@example.com"),
            "Stripe Name".into(),
            format!("drift-{i}"),
        ));
        specs.push((
            format!("match-{i}@example.com"),
            format!("Match{i} User"),
            format!("match-{i}"),
        ));
        specs.push((
            format!("ghost-{i}@example.com"),
            "Ghost User".into(),
            format!("ghost-{i}"),
        ));
        specs.push((
            format!("dangling-{i}@example.com"),
            "Gone User".into(),
            format!("dangling-{i}"),
        ));
    }
    let ids = create_customers(stripe, specs).await;
    // Duplicates are created later than the customers they duplicate.
    let duplicates = create_customers(
        stripe,
        (0..EACH)
            .map(|i| {
                (
                    format!("ok-{i}@example.com"),
                    format!("Ok{i} User"),
                    format!("ok-{i}"),
                )
            })
            .collect(),
    )
    .await;
    assert_eq!(duplicates.len(), EACH);
    for (i, customer) in ids.iter().enumerate().take(OK) {
        let id = format!("ok-{i}");
        store
            .upsert_user(&user(&id, &format!("Ok{i}"), "User"))
            .await
            .unwrap();
        link(store, &id, customer).await;
    }
    for i in 0..EACH {
        let base = OK + 4 * i;
        store
            .upsert_user(&user(&format!("drift-{i}"), "Local", "Name"))
            .await
            .unwrap();
        link(store, &format!("drift-{i}"), &ids[base]).await;
        store
            .upsert_user(&user(&format!("match-{i}"), &format!("Match{i}"), "User"))
            .await
            .unwrap();
        store
            .upsert_user(&user(&format!("dangling-{i}"), "Gone", "User"))
            .await
            .unwrap();
        link(store, &format!("dangling-{i}"), &ids[base + 3]).await;
        stripe.delete_customer(&ids[base + 3]).await;
    }
}

fn counts(report: &Report) -> Vec<(Category, u64)> {
    report.summary.iter().map(|(c, t)| (*c, t.found)).collect()
}

async fn drain_outbox(store: &Arc<dyn Store>, stripe: &StripeClient) {
    let config = support::test_config("http://unused");
    let worker = billsync::jobs::OutboxWorker::new(store.clone(), stripe.clone(), config.outbox);
    eventually(20, "queued pushes delivered", || async {
        worker.tick().await.unwrap();
        (store.queue_stats().await.unwrap().outbox_depth == 0).then_some(())
    })
    .await;
}

async fn listed_customers(stripe: &LocalStripe) -> usize {
    let http = reqwest::Client::new();
    let mut count = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{}/v1/customers?limit=100", stripe.base);
        if let Some(c) = &cursor {
            url.push_str(&format!("&starting_after={c}"));
        }
        let page: Value = http
            .get(url)
            .basic_auth(support::STRIPE_KEY, Some(""))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let data = page["data"].as_array().unwrap();
        count += data.len();
        cursor = data.last().map(|c| c["id"].as_str().unwrap().to_owned());
        if !page["has_more"].as_bool().unwrap_or(false) {
            return count;
        }
    }
}

async fn every_category_is_counted_fixed_and_stays_fixed(backend: Backend) {
    let test = "every_category_is_counted_fixed_and_stays_fixed";
    let Some(store) = backend.store(test).await else {
        return;
    };
    let Some(private) = support::private_localstripe(test).await else {
        return;
    };
    let stripe_fake = LocalStripe::new(&private.base);
    seed(store.store.as_ref(), &stripe_fake).await;
    let listed = OK + 4 * EACH;
    assert_eq!(listed_customers(&stripe_fake).await, listed);

    let config = support::test_config(&private.base);
    let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap()).unwrap();
    let limiter = RateLimiter::per_second(100);
    let quiet = |_: &reconcile::Progress| {};
    let run = |apply| {
        reconcile::run(
            store.store.as_ref(),
            &stripe,
            &limiter,
            apply,
            "rec_test",
            &quiet,
        )
    };

    let report = run(false).await.unwrap();
    assert_eq!(
        counts(&report),
        [
            (Category::Ok, OK as u64),
            (Category::UnlinkedMatch, EACH as u64),
            (Category::Orphan, EACH as u64),
            (Category::Duplicate, EACH as u64),
            (Category::DanglingLink, EACH as u64),
            (Category::Drift, EACH as u64),
        ]
    );
    assert_eq!(report.stripe_customers, listed as u64);
    assert_eq!(report.stripe_pages, 5);
    // Five pages of customers, one of (no) subscriptions, a retrieve per unmet link.
    assert_eq!(report.stripe_requests, 5 + 1 + EACH as u64);
    let drift = report
        .findings
        .iter()
        .find(|f| f.category == Category::Drift)
        .unwrap();
    assert_eq!(drift.fields, ["name"]);
    assert!(report
        .findings
        .iter()
        .filter(|f| f.category == Category::Duplicate)
        .all(|f| f.canonical_customer_id.is_some()));
    assert!(
        report.findings.iter().all(|f| f.action.is_none()),
        "report only"
    );
    assert!(store
        .store
        .get_link(&UserId::parse("match-0").unwrap())
        .await
        .unwrap()
        .is_none());

    let applied = run(true).await.unwrap();
    for (category, fixed) in [
        (Category::UnlinkedMatch, EACH as u64),
        (Category::DanglingLink, EACH as u64),
        (Category::Drift, EACH as u64),
        (Category::Orphan, 0),
        (Category::Duplicate, 0),
        (Category::Ok, 0),
    ] {
        assert_eq!(applied.summary[&category].fixed, fixed, "{category:?}");
    }
    drain_outbox(&store.store, &stripe).await;
    assert_eq!(
        listed_customers(&stripe_fake).await,
        listed,
        "nothing deleted"
    );
    for i in 0..EACH {
        let pushed = stripe_fake
            .customer(
                &report
                    .findings
                    .iter()
                    .find(|f| f.user_id.as_deref() == Some(&format!("drift-{i}")))
                    .unwrap()
                    .customer_id
                    .clone()
                    .unwrap(),
            )
            .await;
        assert_eq!(pushed["name"], "Local Name", "local profile pushed");
    }

    let again = run(true).await.unwrap();
    assert_eq!(
        counts(&again),
        [
            (Category::Ok, (OK + 2 * EACH) as u64),
            (Category::Orphan, EACH as u64),
            (Category::Duplicate, EACH as u64),
        ]
    );
    assert!(again.summary.values().all(|t| t.fixed == 0));

    // The CLI: the same world, the summary on stdout, the full report as JSON.
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_billsync"))
            .args(["reconcile", "--json", json.to_str().unwrap()])
            .env("DATABASE_URL", &store.url)
            .env("STRIPE_SECRET_KEY", support::STRIPE_KEY)
            .env("BILLSYNC_STRIPE_API_BASE", &private.base)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["orphan", "3", "-"]),
        "{table}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("stripe: ") && stderr.contains("done: "),
        "plain progress lines: {stderr}"
    );
    let written: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(written["summary"]["ok"]["found"], (OK + 2 * EACH) as u64);
    // Healthy customers are counted, not listed (issue 16 §3): the orphans and duplicates.
    assert_eq!(written["findings"].as_array().unwrap().len(), 2 * EACH);
    assert!(written["findings"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["category"] != "ok"));
    let text = String::from_utf8_lossy(&std::fs::read(&json).unwrap()).into_owned();
    assert!(
        !text.contains("@example.com"),
        "the report names ids, never emails"
    );

    // The admin API: a background run, followed to its report.
    let app = TestApp::spawn(store.store.clone(), &config).await;
    let id = app.start_reconcile().await;
    let busy = app
        .admin(Method::POST, "/v1/reconcile")
        .send()
        .await
        .unwrap();
    assert_eq!(busy.status(), 409, "one run at a time");
    // Runs live in the database: another instance on it sees this one, and waits for it.
    let other = TestApp::spawn(store.store.clone(), &config).await;
    let elsewhere = other
        .admin(Method::POST, "/v1/reconcile")
        .send()
        .await
        .unwrap();
    assert_eq!(
        elsewhere.status(),
        409,
        "one run at a time across instances"
    );
    let done = other.reconcile_finished(&id).await;
    assert_eq!(done["run"]["status"], "done", "{done}");
    assert_eq!(
        done["run"]["report"]["summary"]["orphan"]["found"],
        EACH as u64
    );
    assert_eq!(done["run"]["progress"]["stripe_pages"], 5);
    let missing = app
        .admin(Method::GET, "/v1/reconcile/rec_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "reconcile_not_found");
}

/// A subscription finding as (user, subscription, fields, action).
type SubscriptionFinding = (Option<String>, String, Vec<&'static str>, Option<String>);

/// The findings of one category.
fn subscription_findings(report: &Report, category: Category) -> Vec<SubscriptionFinding> {
    let mut found: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.category == category)
        .map(|f| {
            (
                f.user_id.clone(),
                f.subscription_id.clone().unwrap(),
                f.fields.clone(),
                f.action.clone(),
            )
        })
        .collect();
    found.sort();
    found
}

/// Subscriptions Stripe has and the mirror lacks, holds otherwise, or whose customer nobody
/// links: reported, and with `--apply` mirrored (announced as a webhook would), except where
/// a webhook mirrored a newer snapshot since: that one is never overwritten.
async fn subscriptions_are_backfilled_and_a_newer_webhook_snapshot_wins(backend: Backend) {
    let test = "subscriptions_are_backfilled";
    let Some(store) = backend.store(test).await else {
        return;
    };
    let Some(private) = support::private_localstripe(test).await else {
        return;
    };
    let stripe_fake = LocalStripe::new(&private.base);
    let store = store.store.clone();
    let names = ["missing", "drifted", "raced", "orphaned"];
    let customers = create_customers(
        &stripe_fake,
        names
            .iter()
            .map(|n| {
                (
                    format!("{n}@example.com"),
                    format!("{n} User"),
                    (*n).to_owned(),
                )
            })
            .collect(),
    )
    .await;
    let mut subscription = std::collections::HashMap::new();
    for (name, customer) in names.iter().zip(&customers) {
        if *name != "orphaned" {
            store.upsert_user(&user(name, name, "User")).await.unwrap();
            link(store.as_ref(), name, customer).await;
        }
        let created = stripe_fake.subscribe(customer, "pro-monthly").await;
        subscription.insert(*name, created["id"].as_str().unwrap().to_owned());
    }
    let config = support::test_config(&private.base);
    let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap()).unwrap();
    let limiter = RateLimiter::per_second(100);
    let quiet = |_: &reconcile::Progress| {};
    let run = |apply| reconcile::run(store.as_ref(), &stripe, &limiter, apply, "rec_subs", &quiet);

    // "drifted" and "raced" were mirrored once, then the mirror moved away from Stripe: one by
    // an old snapshot, one by a webhook newer than anything a backfill may write.
    let fetch = |name: &str| stripe.retrieve_subscription(&subscription[name]);
    for name in ["drifted", "raced"] {
        let user_id = UserId::parse(name).unwrap();
        let mut mirror = fetch(name).await.unwrap().into_mirror(Some(user_id));
        mirror.status = "past_due".into();
        // "raced": a webhook for an event Stripe created 10 s before the run reads its page,
        // inside the margin a backfill leaves to webhooks.
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let created = if name == "raced" { now - 10 } else { 1 };
        assert!(store
            .upsert_subscription_if_newer(&mirror, created, "evt_test")
            .await
            .unwrap());
    }

    let report = run(false).await.unwrap();
    assert_eq!(report.stripe_subscriptions, 4);
    assert_eq!(
        subscription_findings(&report, Category::SubscriptionMissing),
        [(
            Some("missing".into()),
            subscription["missing"].clone(),
            vec![],
            None
        )]
    );
    assert_eq!(
        subscription_findings(&report, Category::SubscriptionDrift),
        [
            (
                Some("drifted".into()),
                subscription["drifted"].clone(),
                vec!["status"],
                None
            ),
            (
                Some("raced".into()),
                subscription["raced"].clone(),
                vec!["status"],
                None
            ),
        ]
    );
    assert_eq!(
        subscription_findings(&report, Category::SubscriptionOrphan),
        [(None, subscription["orphaned"].clone(), vec![], None)]
    );
    assert!(store
        .list_subscriptions(&UserId::parse("missing").unwrap())
        .await
        .unwrap()
        .is_empty());

    let applied = run(true).await.unwrap();
    assert_eq!(applied.summary[&Category::SubscriptionMissing].fixed, 1);
    assert_eq!(applied.summary[&Category::SubscriptionDrift].fixed, 1);
    assert_eq!(
        subscription_findings(&applied, Category::SubscriptionDrift)[1]
            .3
            .as_deref(),
        Some("skipped: a newer snapshot from a webhook is mirrored")
    );
    let status = |name: &'static str| {
        let store = store.clone();
        async move {
            store
                .list_subscriptions(&UserId::parse(name).unwrap())
                .await
                .unwrap()
                .pop()
                .map(|s| s.status)
        }
    };
    assert_eq!(status("missing").await.as_deref(), Some("active"));
    assert_eq!(status("drifted").await.as_deref(), Some("active"));
    assert_eq!(
        status("raced").await.as_deref(),
        Some("past_due"),
        "the newer one stays"
    );
    // Announced as a webhook would have: the new one created, the drifted one updated.
    let announced: Vec<(String, String)> = store
        .list_app_events(billsync::domain::AppEventState::Pending, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind.as_str().starts_with("subscription."))
        .map(|e| (e.key, e.kind.as_str().to_owned()))
        .collect();
    for expected in [
        ("missing", "subscription.created"),
        ("drifted", "subscription.updated"),
    ] {
        assert!(
            announced.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "{expected:?} in {announced:?}"
        );
    }

    let again = run(true).await.unwrap();
    assert_eq!(
        counts(&again)
            .into_iter()
            .filter(|(c, _)| format!("{c:?}").starts_with("Subscription"))
            .collect::<Vec<_>>(),
        [
            (Category::SubscriptionOk, 2),
            (Category::SubscriptionDrift, 1),
            (Category::SubscriptionOrphan, 1),
        ]
    );
    // The backfill's watermark does not hold back what Stripe sends from now on.
    let user_id = UserId::parse("missing").unwrap();
    let mut later = fetch("missing").await.unwrap().into_mirror(Some(user_id));
    later.status = "canceled".into();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        store
            .upsert_subscription_if_newer(&later, now, "evt_later")
            .await
            .unwrap(),
        "a webhook after the backfill is applied"
    );
    assert_eq!(status("missing").await.as_deref(), Some("canceled"));
}

on_every_store!(
    every_category_is_counted_fixed_and_stays_fixed,
    subscriptions_are_backfilled_and_a_newer_webhook_snapshot_wins,
);
