//! Resolve claims: one creator of a customer at a time.

use super::*;

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

on_every_store!(
    resolve_claims_exclude_and_keep_their_start,
    resolve_claim_leases_expire,
    concurrent_claims_admit_one,
);
