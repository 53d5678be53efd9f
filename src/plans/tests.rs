use time::OffsetDateTime;

use super::*;
use crate::domain::SubscriptionItemMirror;

const FILE: &str = r#"
default_plan = "free"
grace_statuses = ["past_due"]

[[plans]]
id = "free"
features = ["projects"]
limits = { projects = 1 }

[[plans]]
id = "pro"
prices = ["price_pro_monthly", "lookup:pro_yearly"]
features = ["projects", "exports"]
limits = { projects = 50, storage_gb = 2.5 }

[[plans]]
id = "team"
prices = ["price_team"]
features = ["projects", "exports", "sso"]
limits = { projects = 500, seats = 20 }
"#;

fn sub(status: &str, prices: &[(&str, Option<&str>)]) -> SubscriptionMirror {
    SubscriptionMirror {
        id: "sub_1".into(),
        user_id: None,
        customer_id: "cus_1".into(),
        status: status.into(),
        price_id: prices.first().map(|(p, _)| (*p).to_owned()),
        cancel_at_period_end: false,
        current_period_end: None,
        updated_at: OffsetDateTime::UNIX_EPOCH,
        cancel_at: None,
        canceled_at: None,
        ended_at: None,
        items: prices
            .iter()
            .map(|(price, key)| SubscriptionItemMirror {
                id: None,
                price_id: Some((*price).to_owned()),
                lookup_key: key.map(str::to_owned),
                quantity: Some(1),
                current_period_end: None,
            })
            .collect(),
    }
}

#[test]
fn a_users_plan_is_the_highest_a_live_item_grants() {
    let plans = Plans::parse(FILE).unwrap();
    let pro = || sub("active", &[("price_pro_monthly", None)]);
    let cases: Vec<(&str, Vec<SubscriptionMirror>, Option<&str>)> = vec![
        ("no subscription: the default", vec![], Some("free")),
        ("an active price", vec![pro()], Some("pro")),
        (
            "trialing counts",
            vec![sub("trialing", &[("price_team", None)])],
            Some("team"),
        ),
        (
            "past_due is grace here",
            vec![sub("past_due", &[("price_pro_monthly", None)])],
            Some("pro"),
        ),
        (
            "unpaid is not",
            vec![sub("unpaid", &[("price_pro_monthly", None)])],
            Some("free"),
        ),
        (
            "canceled is not",
            vec![sub("canceled", &[("price_team", None)])],
            Some("free"),
        ),
        (
            "incomplete is not",
            vec![sub("incomplete", &[("price_team", None)])],
            Some("free"),
        ),
        (
            "two live subscriptions: the higher",
            vec![pro(), sub("active", &[("price_team", None)])],
            Some("team"),
        ),
        (
            "a canceled higher one does not count",
            vec![pro(), sub("canceled", &[("price_team", None)])],
            Some("pro"),
        ),
        (
            "several items: the highest",
            vec![sub(
                "active",
                &[
                    ("price_addon", None),
                    ("price_team", None),
                    ("price_pro_monthly", None),
                ],
            )],
            Some("team"),
        ),
        (
            "by lookup key",
            vec![sub("active", &[("price_unlisted", Some("pro_yearly"))])],
            Some("pro"),
        ),
        (
            "an unknown price: the default",
            vec![sub("active", &[("price_other", None)])],
            Some("free"),
        ),
    ];
    for (case, subscriptions, expected) in cases {
        assert_eq!(
            plans.plan_for(&subscriptions).map(|p| p.id.as_str()),
            expected,
            "{case}"
        );
    }
}

#[test]
fn without_grace_past_due_loses_the_plan() {
    let strict = Plans::parse(&FILE.replace(r#"grace_statuses = ["past_due"]"#, "")).unwrap();
    let past_due = [sub("past_due", &[("price_pro_monthly", None)])];
    assert_eq!(strict.plan_for(&past_due).unwrap().id, "free");
    assert_eq!(strict.plan_of_subscription(&past_due[0]), None);
}

#[test]
fn without_a_default_plan_nobody_unsubscribed_has_one() {
    let plans = Plans::parse(&FILE.replace(r#"default_plan = "free""#, "")).unwrap();
    assert_eq!(plans.plan_for(&[]), None);
    assert_eq!(
        Plans::none().plan_for(&[sub("active", &[("price_team", None)])]),
        None
    );
}

#[test]
fn limits_keep_integers_and_fractions() {
    let plans = Plans::parse(FILE).unwrap();
    let pro = serde_json::to_value(plans.get("pro").unwrap()).unwrap();
    assert_eq!(
        pro,
        serde_json::json!({
            "id": "pro",
            "features": ["projects", "exports"],
            "limits": {"projects": 50, "storage_gb": 2.5}
        })
    );
}

#[test]
fn a_bad_file_is_refused_naming_the_key() {
    let cases = [
        (
            FILE.replace("price_team\"]", "price_team\", \"price_pro_monthly\"]"),
            "plans[2].prices[1]: price_pro_monthly already grants plan `pro`",
        ),
        (
            FILE.replace("lookup:pro_yearly", "prce_1"),
            "plans[1].prices[1]: `prce_1` is neither a price id (price_…) nor lookup:<lookup_key>",
        ),
        (
            FILE.replace("lookup:pro_yearly", "lookup:"),
            "plans[1].prices[1]: `lookup:` is neither a price id (price_…) nor lookup:<lookup_key>",
        ),
        (
            FILE.replace(r#"default_plan = "free""#, r#"default_plan = "gratis""#),
            "default_plan: no plan `gratis` is listed",
        ),
        (
            FILE.replace(r#"["past_due"]"#, r#"["overdue"]"#),
            "grace_statuses[0]: `overdue` is not a Stripe subscription status (incomplete, \
             incomplete_expired, trialing, active, past_due, canceled, unpaid, paused)",
        ),
        (
            FILE.replace(r#"id = "team""#, r#"id = "pro""#),
            "plans[2].id: plan `pro` is listed twice",
        ),
        (
            FILE.replace("seats = 20", r#"seats = "twenty""#),
            "plans[2].limits.seats: must be a number, not a string",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(Plans::parse(&text).unwrap_err().to_string(), expected);
    }
    let unknown = Plans::parse(&FILE.replace("features = [\"projects\"]\n", "feature = []\n"))
        .unwrap_err()
        .to_string();
    assert!(
        unknown.starts_with("line 7: unknown field `feature`"),
        "{unknown}"
    );
}

#[test]
fn prices_lists_every_price_with_its_plan() {
    let plans = Plans::parse(FILE).unwrap();
    let listed: Vec<(String, &str)> = plans
        .prices()
        .map(|(price, plan)| (price.to_string(), plan.id.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            ("price_pro_monthly".to_owned(), "pro"),
            ("lookup:pro_yearly".to_owned(), "pro"),
            ("price_team".to_owned(), "team"),
        ]
    );
}

#[test]
fn the_shipped_example_parses() {
    let plans = Plans::parse(include_str!("../../plans.example.toml")).unwrap();
    assert_eq!(plans.plan_for(&[]).unwrap().id, "free");
    assert_eq!(plans.prices().count(), 3);
}

#[test]
fn a_user_hears_a_plan_only_when_it_differs_from_what_they_were_told() {
    let free =
        serde_json::json!({"id": "free", "features": ["projects"], "limits": {"projects": 1}});
    let pro = serde_json::json!({"id": "pro", "features": ["projects", "exports"], "limits": {}});
    let free_more =
        serde_json::json!({"id": "free", "features": ["projects"], "limits": {"projects": 2}});
    let told = |plan: &serde_json::Value| Announced {
        plan_id: plan["id"].as_str().map(str::to_owned),
        plan: Some(plan.clone()),
    };
    let told_id_only = Announced {
        plan_id: Some("free".into()),
        plan: None,
    };
    let told_nothing = Announced {
        plan_id: None,
        plan: None,
    };
    // (their row, what everyone without a row was told, the plan now, Some(previous) to announce)
    let cases = [
        (None, Some(&free), Some(&free), None),
        (None, Some(&free), Some(&pro), Some(Some("free"))),
        (None, None, Some(&pro), Some(None)),
        (None, None, None, None),
        (Some(&told(&free)), None, Some(&free), None),
        (Some(&told(&free)), None, Some(&pro), Some(Some("free"))),
        // Same id, other limits: a change.
        (
            Some(&told(&free)),
            None,
            Some(&free_more),
            Some(Some("free")),
        ),
        // A row from before contents were recorded: only the id compares.
        (Some(&told_id_only), None, Some(&free_more), None),
        (Some(&told_nothing), Some(&free), None, None),
    ];
    for (i, (announced, unrecorded, computed, expected)) in cases.into_iter().enumerate() {
        let got = announcement(announced, unrecorded, computed);
        assert_eq!(got.as_ref().map(|p| p.as_deref()), expected, "case {i}");
    }
}
