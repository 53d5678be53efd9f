//! The database itself: migrations, health, durability, the serving lock.

use super::*;

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

/// The embedded default: commits are on disk before they are acknowledged, the file is the
/// owner's alone, one process serves it, and a CLI command beside it frees nobody's leases.
#[tokio::test]
async fn sqlite_is_durable_private_and_served_by_one_process() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("billsync.db");
    let url = format!("sqlite://{}", file.display());
    let options = billsync::store::StoreOptions::new(4);
    let serving = billsync::store::SqliteStore::connect(&url, &options)
        .await
        .unwrap();
    serving.migrate().await.unwrap();
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(serving.pool())
        .await
        .unwrap();
    assert_eq!(synchronous, 2, "synchronous=FULL");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "database file mode {mode:o}");

    serving.claim_serving().await.unwrap();
    let leased = serving
        .try_lease_customers(&["cus_L".to_owned()], "serving", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(leased, ["cus_L"]);

    // A CLI command opens the same file: the server's lease stays.
    let cli = billsync::store::SqliteStore::connect(&url, &options)
        .await
        .unwrap();
    cli.migrate().await.unwrap();
    assert!(
        cli.try_lease_customers(&["cus_L".to_owned()], "cli", Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "the serving process's lease was cleared by another connect"
    );
    // A second server is refused, naming the file.
    match cli.claim_serving().await {
        Err(StoreError::InUse(message)) => assert!(message.contains("billsync.db"), "{message}"),
        other => panic!("second claim: {other:?}"),
    }
    // Once the first server is gone, the next one takes over and frees its leases.
    drop(serving);
    cli.claim_serving().await.unwrap();
    assert_eq!(
        cli.try_lease_customers(&["cus_L".to_owned()], "cli", Duration::from_secs(60))
            .await
            .unwrap(),
        ["cus_L"]
    );
}

on_every_store!(migrations_are_idempotent_and_ping_works,);
