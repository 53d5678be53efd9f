//! One conformance suite, run against every store backend.

mod support;

use std::{sync::Arc, time::Duration};

use billsync::{
    domain::{Email, LinkSource, PersonName, Phone, StripeCustomerId, UserId},
    store::{LinkOutcome, Store, UserUpsert},
};
use support::Backend;

fn upsert(id: &str, email: &str) -> UserUpsert {
    UserUpsert {
        id: UserId::parse(id).unwrap(),
        email: Email::parse(email).unwrap(),
        email_verified: false,
        first_name: None,
        last_name: None,
        phone: None,
    }
}

fn cus(id: &str) -> StripeCustomerId {
    StripeCustomerId::parse(id).unwrap()
}

async fn users_round_trip_and_version_counts_changes(backend: Backend) {
    let Some(t) = backend
        .store("users_round_trip_and_version_counts_changes")
        .await
    else {
        return;
    };
    let store = &t.store;
    let id = UserId::parse("user-1").unwrap();
    assert_eq!(store.get_user(&id).await.unwrap(), None);

    let created = store
        .upsert_user(&upsert("user-1", "ada@example.com"))
        .await
        .unwrap();
    assert_eq!(created.version, 1);
    assert_eq!(created.email.as_str(), "ada@example.com");
    assert_eq!(created.first_name, None);
    assert_eq!(created.created_at, created.updated_at);
    assert_eq!(store.get_user(&id).await.unwrap().as_ref(), Some(&created));

    // The same profile again changes nothing, not even the version.
    let same = store
        .upsert_user(&upsert("user-1", "ada@example.com"))
        .await
        .unwrap();
    assert_eq!(same, created);

    let full = UserUpsert {
        email_verified: true,
        first_name: PersonName::parse_optional(Some("Ada"), "f").unwrap(),
        last_name: PersonName::parse_optional(Some("Lovelace"), "l").unwrap(),
        phone: Some(Phone::parse("+14155550123").unwrap()),
        ..upsert("user-1", "ada@example.com")
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let changed = store.upsert_user(&full).await.unwrap();
    assert_eq!(changed.version, 2);
    assert!(changed.email_verified);
    assert_eq!(changed.first_name.as_ref().unwrap().as_str(), "Ada");
    assert_eq!(changed.last_name.as_ref().unwrap().as_str(), "Lovelace");
    assert_eq!(changed.phone.as_ref().unwrap().as_str(), "+14155550123");
    assert_eq!(changed.created_at, created.created_at);
    assert!(changed.updated_at > created.updated_at);
    assert_eq!(store.get_user(&id).await.unwrap().as_ref(), Some(&changed));

    // Clearing a field is a change too.
    let cleared = store
        .upsert_user(&UserUpsert {
            phone: None,
            ..full
        })
        .await
        .unwrap();
    assert_eq!(cleared.version, 3);
    assert_eq!(cleared.phone, None);
}

async fn hostile_strings_are_data(backend: Backend) {
    let Some(t) = backend.store("hostile_strings_are_data").await else {
        return;
    };
    let nasty_id = "x'); DROP TABLE users; -- \"{}\\ %_";
    let user = UserUpsert {
        first_name: PersonName::parse_optional(Some("Robert'); DROP TABLE users;--"), "f").unwrap(),
        last_name: PersonName::parse_optional(Some("{\"json\": [1]} \\u0000"), "l").unwrap(),
        ..upsert(nasty_id, "o'brien+tag@example.com")
    };
    let stored = t.store.upsert_user(&user).await.unwrap();
    assert_eq!(stored.id.as_str(), nasty_id);
    assert_eq!(stored.first_name, user.first_name);
    assert_eq!(stored.last_name, user.last_name);
    assert_eq!(stored.email.as_str(), "o'brien+tag@example.com");
    // The table is still there and holds exactly that row.
    let again = t.store.get_user(&user.id).await.unwrap().unwrap();
    assert_eq!(again, stored);
    assert_eq!(
        t.store
            .get_user(&UserId::parse("x").unwrap())
            .await
            .unwrap(),
        None
    );
}

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

async fn resolve_claims_exclude_and_keep_their_start(backend: Backend) {
    let Some(t) = backend
        .store("resolve_claims_exclude_and_keep_their_start")
        .await
    else {
        return;
    };
    let store = &t.store;
    let user = UserId::parse("claimed").unwrap();
    store
        .upsert_user(&upsert("claimed", "c@example.com"))
        .await
        .unwrap();
    let lease = Duration::from_secs(60);

    let first = store
        .try_claim_resolve(&user, "h1", lease)
        .await
        .unwrap()
        .expect("free claim");
    assert_eq!(
        store.try_claim_resolve(&user, "h2", lease).await.unwrap(),
        None
    );

    // A failed attempt expires the claim but keeps its start for the retry.
    store.release_resolve(&user, "h1", false).await.unwrap();
    let retried = store
        .try_claim_resolve(&user, "h2", lease)
        .await
        .unwrap()
        .expect("expired claim");
    assert_eq!(retried.started_at, first.started_at);

    // Only the holder can release.
    store.release_resolve(&user, "h1", true).await.unwrap();
    assert_eq!(
        store.try_claim_resolve(&user, "h3", lease).await.unwrap(),
        None
    );

    // A completed claim is gone: the next one starts afresh.
    store.release_resolve(&user, "h2", true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fresh = store
        .try_claim_resolve(&user, "h3", lease)
        .await
        .unwrap()
        .expect("new claim");
    assert!(fresh.started_at > first.started_at);
}

async fn resolve_claim_leases_expire(backend: Backend) {
    let Some(t) = backend.store("resolve_claim_leases_expire").await else {
        return;
    };
    let store = &t.store;
    let user = UserId::parse("crashed").unwrap();
    store
        .upsert_user(&upsert("crashed", "c@example.com"))
        .await
        .unwrap();
    let held = store
        .try_claim_resolve(&user, "dead-instance", Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .try_claim_resolve(&user, "h2", Duration::from_secs(60))
            .await
            .unwrap(),
        None
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let taken = store
        .try_claim_resolve(&user, "h2", Duration::from_secs(60))
        .await
        .unwrap()
        .expect("an expired lease can be taken over");
    assert_eq!(taken.started_at, held.started_at);
}

async fn concurrent_claims_admit_one(backend: Backend) {
    let Some(t) = backend.store("concurrent_claims_admit_one").await else {
        return;
    };
    t.store
        .upsert_user(&upsert("contended", "c@example.com"))
        .await
        .unwrap();
    let store: Arc<dyn Store> = t.store.clone();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .try_claim_resolve(
                        &UserId::parse("contended").unwrap(),
                        &format!("holder-{i}"),
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap()
                    .is_some()
            })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(winners, 1);
}

async fn migrations_are_idempotent_and_ping_works(backend: Backend) {
    let Some(t) = backend
        .store("migrations_are_idempotent_and_ping_works")
        .await
    else {
        return;
    };
    t.store.migrate().await.unwrap();
    t.store.ping().await.unwrap();
    // A second process opening the same database sees the same data.
    t.store
        .upsert_user(&upsert("persisted", "p@example.com"))
        .await
        .unwrap();
    let reopened = billsync::store::connect(&t.url, 2).await.unwrap();
    reopened.migrate().await.unwrap();
    assert!(reopened
        .get_user(&UserId::parse("persisted").unwrap())
        .await
        .unwrap()
        .is_some());
    assert_eq!(reopened.backend(), t.store.backend());
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
    assert_eq!(store.remove_link(&user).await.unwrap(), None);
    store
        .insert_link(&user, &cus("cus_L1"), false, LinkSource::Created)
        .await
        .unwrap();
    // Read it twice so a caching store has it in memory.
    assert!(store.get_link(&user).await.unwrap().is_some());
    assert!(store.get_link(&user).await.unwrap().is_some());
    let removed = store
        .remove_link(&user)
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

on_every_store!(
    removed_links_are_gone_at_once,
    users_round_trip_and_version_counts_changes,
    hostile_strings_are_data,
    links_are_unique_on_both_sides,
    concurrent_links_make_exactly_one,
    resolve_claims_exclude_and_keep_their_start,
    resolve_claim_leases_expire,
    concurrent_claims_admit_one,
    migrations_are_idempotent_and_ping_works,
);

/// Another instance's writes, and an operator's SQL, reach this instance's link cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_link_cache_follows_other_instances() {
    let Some(t) = support::postgres_store("postgres_link_cache_follows_other_instances").await
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
    other.remove_link(&user).await.unwrap();
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
