//! Subscriptions, usage and pushes: the mirror round-trips, and its watermarks.

use super::*;

async fn usage_subscriptions_and_pushes_round_trip(backend: Backend) {
    let Some(t) = backend
        .store("usage_subscriptions_and_pushes_round_trip")
        .await
    else {
        return;
    };
    let store = &t.store;
    let user = UserId::parse("u").unwrap();
    store
        .upsert_user(&upsert("u", "u@example.com"))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            store
                .insert_usage_record(&user, "seats", i, billsync::store::now())
                .await
                .unwrap(),
        );
    }
    let first = store.usage_records_page(&user, 0, 2).await.unwrap();
    assert_eq!(first.iter().map(|r| r.quantity).collect::<Vec<_>>(), [0, 1]);
    let rest = store
        .usage_records_page(&user, first[1].id, 10)
        .await
        .unwrap();
    assert_eq!(
        rest.iter().map(|r| r.quantity).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert_eq!(rest.last().unwrap().id, *ids.last().unwrap());

    let mut sub = SubscriptionMirror {
        id: "sub_1".into(),
        user_id: Some(user.clone()),
        customer_id: "cus_U".into(),
        status: "active".into(),
        price_id: Some("price_1".into()),
        cancel_at_period_end: false,
        current_period_end: Some(billsync::store::now()),
        updated_at: billsync::store::now(),
        cancel_at: None,
        canceled_at: None,
        ended_at: None,
        items: vec![],
    };
    store
        .upsert_subscription_if_newer(&sub, 1, "evt_sub_1")
        .await
        .unwrap();
    sub.status = "canceled".into();
    sub.cancel_at_period_end = true;
    // basil's cancellation fields and every item round-trip (issue 12 §4).
    sub.cancel_at = Some(billsync::store::now());
    sub.canceled_at = Some(billsync::store::now());
    sub.ended_at = Some(billsync::store::now());
    sub.items = vec![
        billsync::store::SubscriptionItemMirror {
            lookup_key: None,
            id: Some("si_1".into()),
            price_id: Some("price_1".into()),
            quantity: Some(1),
            current_period_end: Some(1_900_000_000),
        },
        billsync::store::SubscriptionItemMirror {
            lookup_key: None,
            id: Some("si_2".into()),
            price_id: Some("price_2".into()),
            quantity: Some(5),
            current_period_end: None,
        },
    ];
    store
        .upsert_subscription_if_newer(&sub, 2, "evt_sub_2")
        .await
        .unwrap();
    assert_eq!(store.list_subscriptions(&user).await.unwrap(), vec![sub]);

    assert_eq!(store.last_push(&user).await.unwrap(), None);
    store
        .insert_link(&user, &cus("cus_U"), false, LinkSource::Created)
        .await
        .unwrap();
    let pushed = PushedProfile {
        email: "u@example.com".into(),
        name: Some("U Name".into()),
        phone: None,
        version: 7,
    };
    store.record_push(&user, &pushed).await.unwrap();
    assert_eq!(store.last_push(&user).await.unwrap(), Some(pushed));
}

/// Issue 12 §3: the subscriptions' watermark carries the event id, and a customer's
/// deletion raises it, so an older subscription event cannot write the mirror again.
async fn subscription_watermarks_rise_with_a_deletion(backend: Backend) {
    let Some(t) = backend
        .store("subscription_watermarks_rise_with_a_deletion")
        .await
    else {
        return;
    };
    let store = &t.store;
    let user = UserId::parse("s").unwrap();
    store
        .upsert_user(&upsert("s", "s@example.com"))
        .await
        .unwrap();
    let sub = SubscriptionMirror {
        id: "sub_W".into(),
        user_id: Some(user.clone()),
        customer_id: "cus_W".into(),
        status: "active".into(),
        price_id: Some("price_1".into()),
        cancel_at_period_end: false,
        current_period_end: None,
        updated_at: billsync::store::now(),
        cancel_at: None,
        canceled_at: None,
        ended_at: None,
        items: vec![],
    };
    assert_eq!(store.subscription_watermark("sub_W").await.unwrap(), None);
    assert!(store
        .upsert_subscription_if_newer(&sub, 100, "evt_1")
        .await
        .unwrap());
    assert_eq!(
        store.subscription_watermark("sub_W").await.unwrap(),
        Some((100, Some("evt_1".to_owned())))
    );
    assert_eq!(
        store
            .cancel_customer_subscriptions("cus_W", 300, "evt_del")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.subscription_watermark("sub_W").await.unwrap(),
        Some((300, Some("evt_del".to_owned())))
    );
    assert!(
        !store
            .upsert_subscription_if_newer(&sub, 200, "evt_2")
            .await
            .unwrap(),
        "older than the deletion"
    );
    let rows = store.list_subscriptions(&user).await.unwrap();
    assert_eq!(rows[0].status, "canceled");
    let mut newer = sub.clone();
    newer.status = "active".into();
    newer.cancel_at = Some(billsync::store::now());
    newer.items = rows[0].items.clone();
    newer.items.push(billsync::store::SubscriptionItemMirror {
        lookup_key: None,
        id: Some("si_W".into()),
        price_id: None,
        quantity: Some(2),
        current_period_end: Some(5),
    });
    assert!(store
        .upsert_subscription_if_newer(&newer, 400, "evt_4")
        .await
        .unwrap());
    let rows = store.list_subscriptions(&user).await.unwrap();
    assert_eq!(
        (rows[0].cancel_at, &rows[0].items),
        (newer.cancel_at, &newer.items)
    );
    // A deletion older than the watermark keeps it.
    store
        .cancel_customer_subscriptions("cus_W", 250, "evt_old_del")
        .await
        .unwrap();
    assert_eq!(
        store.subscription_watermark("sub_W").await.unwrap(),
        Some((400, Some("evt_4".to_owned())))
    );
}

on_every_store!(
    subscription_watermarks_rise_with_a_deletion,
    usage_subscriptions_and_pushes_round_trip,
);
