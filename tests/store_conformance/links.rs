//! Links between users and customers, and the link cache that serves them.

use super::*;

async fn links_are_unique_on_both_sides(backend: Backend) {
    let Some(t) = backend.store("links_are_unique_on_both_sides").await else {
        return;
    };
    let store = &t.store;
    let (a, b) = (UserId::parse("a").unwrap(), UserId::parse("b").unwrap());
    store
        .upsert_user(&upsert("a", "a@example.com"))
        .await
        .unwrap();
    store
        .upsert_user(&upsert("b", "b@example.com"))
        .await
        .unwrap();
    assert_eq!(store.get_link(&a).await.unwrap(), None);

    let linked = match store
        .insert_link(&a, &cus("cus_A1"), false, LinkSource::Created)
        .await
        .unwrap()
    {
        LinkOutcome::Linked(link) => link,
        other => panic!("expected Linked, got {other:?}"),
    };
    assert_eq!(linked.user_id, a);
    assert_eq!(linked.customer_id, cus("cus_A1"));
    assert_eq!(linked.linked_via, LinkSource::Created);
    assert!(!linked.livemode);
    assert_eq!(store.get_link(&a).await.unwrap().as_ref(), Some(&linked));
    assert_eq!(
        store
            .get_link_by_customer(&cus("cus_A1"))
            .await
            .unwrap()
            .as_ref(),
        Some(&linked)
    );

    // A second customer for the same user is refused, and the first one reported.
    assert_eq!(
        store
            .insert_link(&a, &cus("cus_A2"), false, LinkSource::StripeEmail)
            .await
            .unwrap(),
        LinkOutcome::UserAlreadyLinked(linked.clone())
    );
    // The same customer for another user is refused.
    assert_eq!(
        store
            .insert_link(&b, &cus("cus_A1"), false, LinkSource::StripeEmail)
            .await
            .unwrap(),
        LinkOutcome::CustomerTaken {
            other_user: a.clone()
        }
    );
    // A link needs its user.
    assert_eq!(
        store
            .insert_link(
                &UserId::parse("ghost").unwrap(),
                &cus("cus_G"),
                false,
                LinkSource::Created
            )
            .await
            .unwrap(),
        LinkOutcome::UserMissing
    );
    assert_eq!(store.get_link(&b).await.unwrap(), None);
    assert_eq!(
        store.get_link_by_customer(&cus("cus_G")).await.unwrap(),
        None
    );
}

/// Issue 12 §9: a customer deleted in Stripe is never linked again, by anyone.
async fn deleted_customers_are_never_linked(backend: Backend) {
    let Some(t) = backend.store("deleted_customers_are_never_linked").await else {
        return;
    };
    let store = &t.store;
    let a = UserId::parse("a").unwrap();
    store
        .upsert_user(&upsert("a", "a@example.com"))
        .await
        .unwrap();
    store.record_deleted_customer("cus_D", 200).await.unwrap();
    // Recorded again with an older event: still deleted.
    store.record_deleted_customer("cus_D", 100).await.unwrap();
    assert_eq!(
        store
            .insert_link(&a, &cus("cus_D"), false, LinkSource::StripeMetadata)
            .await
            .unwrap(),
        LinkOutcome::CustomerDeleted
    );
    assert_eq!(store.get_link(&a).await.unwrap(), None);
    assert_eq!(
        store.get_link_by_customer(&cus("cus_D")).await.unwrap(),
        None
    );
    // Another customer still links.
    assert!(matches!(
        store
            .insert_link(&a, &cus("cus_E"), false, LinkSource::Created)
            .await
            .unwrap(),
        LinkOutcome::Linked(_)
    ));
}

async fn concurrent_links_make_exactly_one(backend: Backend) {
    let Some(t) = backend.store("concurrent_links_make_exactly_one").await else {
        return;
    };
    t.store
        .upsert_user(&upsert("racer", "r@example.com"))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = t.store.clone();
            tokio::spawn(async move {
                store
                    .insert_link(
                        &UserId::parse("racer").unwrap(),
                        &cus(&format!("cus_R{i}")),
                        false,
                        LinkSource::Created,
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut linked = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            LinkOutcome::Linked(_) => linked += 1,
            LinkOutcome::UserAlreadyLinked(_) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((linked, refused), (1, 19));
}

async fn removed_links_are_gone_at_once(backend: Backend) {
    let Some(t) = backend.store("removed_links_are_gone_at_once").await else {
        return;
    };
    let store = &t.store;
    let user = UserId::parse("leaving").unwrap();
    store
        .upsert_user(&upsert("leaving", "l@example.com"))
        .await
        .unwrap();
    assert_eq!(
        store
            .remove_link(&user, UnlinkReason::Reconcile)
            .await
            .unwrap(),
        None
    );
    store
        .insert_link(&user, &cus("cus_L1"), false, LinkSource::Created)
        .await
        .unwrap();
    // Read it twice so a caching store has it in memory.
    assert!(store.get_link(&user).await.unwrap().is_some());
    assert!(store.get_link(&user).await.unwrap().is_some());
    let removed = store
        .remove_link(&user, UnlinkReason::Reconcile)
        .await
        .unwrap()
        .expect("the removed link");
    assert_eq!(removed.customer_id, cus("cus_L1"));
    assert_eq!(store.get_link(&user).await.unwrap(), None);
    assert_eq!(
        store.get_link_by_customer(&cus("cus_L1")).await.unwrap(),
        None
    );
    // The customer is free again; the user can be linked anew.
    assert!(matches!(
        store
            .insert_link(&user, &cus("cus_L2"), false, LinkSource::Created)
            .await
            .unwrap(),
        LinkOutcome::Linked(_)
    ));
    assert_eq!(
        store.get_link(&user).await.unwrap().unwrap().customer_id,
        cus("cus_L2")
    );
}

/// Another instance's writes, and an operator's SQL, reach this instance's link cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_link_cache_follows_other_instances() {
    let Some(t) = Backend::Postgres
        .store("postgres_link_cache_follows_other_instances")
        .await
    else {
        return;
    };
    let options = billsync::store::StoreOptions::new(4);
    let cached = billsync::store::PgStore::connect(&t.url, &options)
        .await
        .unwrap();
    let other = &t.store;
    let user = UserId::parse("cached").unwrap();
    other
        .upsert_user(&upsert("cached", "c@example.com"))
        .await
        .unwrap();
    other
        .insert_link(&user, &cus("cus_C1"), false, LinkSource::Created)
        .await
        .unwrap();

    // Wait for the listener, then for the link to be served from memory.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cached.cached_links() == 0 {
        assert!(std::time::Instant::now() < deadline, "link never cached");
        assert!(cached.get_link(&user).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Unlinked by another instance: evicted here without waiting for the TTL.
    other
        .remove_link(&user, UnlinkReason::Reconcile)
        .await
        .unwrap();
    wait_until_uncached(&cached, &user, None).await;

    // Re-linked, cached again, then changed by hand in SQL.
    other
        .insert_link(&user, &cus("cus_C2"), false, LinkSource::Created)
        .await
        .unwrap();
    assert_eq!(
        cached.get_link(&user).await.unwrap().unwrap().customer_id,
        cus("cus_C2")
    );
    let pool = sqlx::PgPool::connect(&t.url).await.unwrap();
    sqlx::query("UPDATE customer_links SET stripe_customer_id = 'cus_C3' WHERE user_id = 'cached'")
        .execute(&pool)
        .await
        .unwrap();
    wait_until_uncached(&cached, &user, Some(cus("cus_C3"))).await;

    // Deleting the user cascades to the link, and that is seen too.
    sqlx::query("DELETE FROM users WHERE id = 'cached'")
        .execute(&pool)
        .await
        .unwrap();
    wait_until_uncached(&cached, &user, None).await;
}

async fn wait_until_uncached(
    store: &billsync::store::PgStore,
    user: &UserId,
    expected: Option<StripeCustomerId>,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let seen = store.get_link(user).await.unwrap().map(|l| l.customer_id);
        if seen == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still serving {seen:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

on_every_store!(
    deleted_customers_are_never_linked,
    removed_links_are_gone_at_once,
    links_are_unique_on_both_sides,
    concurrent_links_make_exactly_one,
);
