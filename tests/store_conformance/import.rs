//! Bulk import: each user written as `upsert_user` writes one, batch by batch, and an erased
//! person never created again, even by an import that races the erasure.

use billsync::domain::{AppEventState, AppEventType, ImportOutcome, UserImport};

use super::*;

fn import(id: &str, email: &str) -> UserImport {
    UserImport {
        user: upsert(id, email),
        subject: format!("subject-of-{id}"),
    }
}

fn named(id: &str, email: &str, first_name: &str) -> UserImport {
    let mut row = import(id, email);
    row.user.first_name = PersonName::parse_optional(Some(first_name), "first_name").unwrap();
    row
}

/// Each outcome as a word and the version it left.
fn outcomes(found: &[ImportOutcome]) -> Vec<(&'static str, i64)> {
    found
        .iter()
        .map(|o| match o {
            ImportOutcome::Created(u) => ("created", u.version),
            ImportOutcome::Updated(u) => ("updated", u.version),
            ImportOutcome::Unchanged(u) => ("unchanged", u.version),
            ImportOutcome::Erased => ("erased", 0),
        })
        .collect()
}

async fn user_updated_events(store: &dyn Store) -> Vec<(String, serde_json::Value)> {
    store
        .list_app_events(AppEventState::Pending, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == AppEventType::UserUpdated)
        .map(|e| (e.key, e.data["changed"].clone()))
        .collect()
}

async fn an_import_writes_each_user_as_an_upsert_would(backend: Backend) {
    let Some(t) = backend
        .store("an_import_writes_each_user_as_an_upsert_would")
        .await
    else {
        return;
    };
    let store = &t.store;
    store
        .upsert_user(&upsert("kept", "kept@example.com"))
        .await
        .unwrap();
    store
        .upsert_user(&upsert("renamed", "r@example.com"))
        .await
        .unwrap();

    let rows = vec![
        import("new", "new@example.com"),
        import("kept", "kept@example.com"),
        named("renamed", "r@example.com", "Ada"),
        // The same address spelt otherwise is not a change, as for `upsert_user`.
        import("kept2", "Kept2@Example.com"),
        import("twice", "first@example.com"),
        // A repeated id: written after the rows before it, so the later row wins.
        import("twice", "second@example.com"),
    ];
    let found = store.import_users(&rows).await.unwrap();
    assert_eq!(
        outcomes(&found),
        [
            ("created", 1),
            ("unchanged", 1),
            ("updated", 2),
            ("created", 1),
            ("created", 1),
            ("updated", 2),
        ]
    );
    let twice = store
        .get_user(&UserId::parse("twice").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(twice.email.as_str(), "second@example.com");
    let kept2 = store
        .get_user(&UserId::parse("kept2").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept2.email.as_given(), Some("Kept2@Example.com"));
    let ImportOutcome::Updated(renamed) = &found[2] else {
        unreachable!()
    };
    assert_eq!(renamed.first_name.as_ref().unwrap().as_str(), "Ada");

    // A change of an existing user queues a push and says what changed, as a PUT does; a
    // new user does neither.
    let mut pushes = store
        .list_jobs(Some(JobState::Pending), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| (j.kind, j.user_id))
        .collect::<Vec<_>>();
    pushes.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        pushes,
        [
            (JobKind::PushProfile, "renamed".to_owned()),
            (JobKind::PushProfile, "twice".to_owned())
        ]
    );
    let mut announced = user_updated_events(store.as_ref()).await;
    announced.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        announced,
        [
            ("renamed".to_owned(), serde_json::json!(["first_name"])),
            ("twice".to_owned(), serde_json::json!(["email"]))
        ]
    );

    // The same import again finds everything as it is: nothing written, nothing queued.
    let again = store.import_users(&rows[..5]).await.unwrap();
    assert_eq!(
        outcomes(&again),
        [
            ("unchanged", 1),
            ("unchanged", 1),
            ("unchanged", 2),
            ("unchanged", 1),
            // The file's first "twice" row, after the second one won: a change back.
            ("updated", 3),
        ]
    );
    let again = store.import_users(&rows[5..]).await.unwrap();
    assert_eq!(outcomes(&again), [("updated", 4)]);
    let again = store.import_users(&rows[5..]).await.unwrap();
    assert_eq!(outcomes(&again), [("unchanged", 4)]);
    assert_eq!(store.list_jobs(None, 10).await.unwrap().len(), 2);
}

async fn an_erased_person_is_not_imported_again(backend: Backend) {
    let Some(t) = backend
        .store("an_erased_person_is_not_imported_again")
        .await
    else {
        return;
    };
    let store = &t.store;
    // Erased, no account since: an old export naming them creates nothing.
    store.record_tombstone("subject-of-gone").await.unwrap();
    // Erased, then signed in with a newer token: they have an account again, kept current.
    store.record_tombstone("subject-of-back").await.unwrap();
    store
        .upsert_user(&upsert("back", "back@example.com"))
        .await
        .unwrap();

    let found = store
        .import_users(&[
            import("gone", "gone@example.com"),
            named("back", "back@example.com", "Grace"),
            import("other", "other@example.com"),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes(&found),
        [("erased", 0), ("updated", 2), ("created", 1)]
    );
    assert_eq!(
        store
            .get_user(&UserId::parse("gone").unwrap())
            .await
            .unwrap(),
        None
    );
    // It is the person's tombstone that counts, not their id: another subject is imported.
    let mut renamed_subject = import("gone", "gone@example.com");
    renamed_subject.subject = "subject-of-someone-else".into();
    assert_eq!(
        outcomes(&store.import_users(&[renamed_subject]).await.unwrap()),
        [("created", 1)]
    );
}

/// The erasure writes its tombstone, then deletes the rows; an import running meanwhile
/// either updates the user before the deletion (which then removes them) or finds them
/// erased. Either way the person is gone afterwards.
async fn an_import_racing_an_erasure_never_brings_the_person_back(backend: Backend) {
    let Some(t) = backend
        .store("an_import_racing_an_erasure_never_brings_the_person_back")
        .await
    else {
        return;
    };
    let store: Arc<dyn Store> = t.store.clone();
    for round in 0..20 {
        let id = format!("racer-{round}");
        store
            .upsert_user(&upsert(&id, "racer@example.com"))
            .await
            .unwrap();
        let user = UserId::parse(&id).unwrap();
        let subject = format!("subject-of-{id}");
        let erasing = {
            let (store, user, subject) = (store.clone(), user.clone(), subject.clone());
            tokio::spawn(async move {
                store.record_tombstone(&subject).await.unwrap();
                store
                    .erase_user(&user, None, &subject, &serde_json::json!({}))
                    .await
                    .unwrap()
            })
        };
        let importing = {
            let store = store.clone();
            let rows = (0..20)
                .map(|n| named(&id, "racer@example.com", &format!("N{n}")))
                .collect::<Vec<_>>();
            tokio::spawn(async move {
                for row in rows {
                    store.import_users(&[row]).await.unwrap();
                }
            })
        };
        assert!(matches!(erasing.await.unwrap(), Erased::Done(_)));
        importing.await.unwrap();
        assert_eq!(
            store.get_user(&user).await.unwrap(),
            None,
            "round {round}: the import brought the erased person back"
        );
    }
}

/// The erasure's last step, held open: its tombstone is written (before the rows go, as the
/// saga does), and its transaction holds the user's row when an import of them starts. The
/// import waits for the row, finds it gone, and the person erased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_import_waiting_on_an_erasing_transaction_finds_the_person_erased() {
    use sqlx::Connection;
    let Some(t) = Backend::Postgres
        .store("an_import_waiting_on_an_erasing_transaction")
        .await
    else {
        return;
    };
    let store: Arc<dyn Store> = t.store.clone();
    store
        .upsert_user(&upsert("held", "held@example.com"))
        .await
        .unwrap();
    store.record_tombstone("subject-of-held").await.unwrap();
    let mut eraser = sqlx::PgConnection::connect(&t.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut eraser).await.unwrap();
    sqlx::query("SELECT 1 FROM users WHERE id = 'held' FOR UPDATE")
        .execute(&mut eraser)
        .await
        .unwrap();
    let importing = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .import_users(&[named("held", "held@example.com", "Ada")])
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!importing.is_finished(), "the import waits for the row");
    sqlx::query("DELETE FROM users WHERE id = 'held'")
        .execute(&mut eraser)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut eraser).await.unwrap();
    assert_eq!(outcomes(&importing.await.unwrap()), [("erased", 0)]);
    assert_eq!(
        store
            .get_user(&UserId::parse("held").unwrap())
            .await
            .unwrap(),
        None
    );
}

/// A person billsync never held: their account is deleted (the tombstone is being written)
/// while an import creates them. The import waits for the tombstone's transaction and then
/// finds them erased; it must not read "no tombstone" and create them meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_import_of_a_new_user_waits_for_a_tombstone_being_written() {
    use sqlx::Connection;
    let Some(t) = Backend::Postgres
        .store("an_import_of_a_new_user_waits_for_a_tombstone")
        .await
    else {
        return;
    };
    let store: Arc<dyn Store> = t.store.clone();
    // The tombstone's transaction, as `record_tombstone` runs it, held open before its commit.
    let mut eraser = sqlx::PgConnection::connect(&t.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut eraser).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
        .bind(0x6572_6173_i32)
        .execute(&mut eraser)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO erasure_tombstones (subject, erased_at) VALUES ('subject-of-newcomer', now())",
    )
    .execute(&mut eraser)
    .await
    .unwrap();
    let importing = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .import_users(&[import("newcomer", "newcomer@example.com")])
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !importing.is_finished(),
        "the import waits for the tombstone"
    );
    sqlx::query("COMMIT").execute(&mut eraser).await.unwrap();
    assert_eq!(outcomes(&importing.await.unwrap()), [("erased", 0)]);
    assert_eq!(
        store
            .get_user(&UserId::parse("newcomer").unwrap())
            .await
            .unwrap(),
        None
    );

    // And a tombstone waits for an import batch in flight (held here as the batch holds it).
    let mut batch = sqlx::PgConnection::connect(&t.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut batch).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1, 0)")
        .bind(0x6572_6173_i32)
        .execute(&mut batch)
        .await
        .unwrap();
    let recording = {
        let store = store.clone();
        tokio::spawn(async move { store.record_tombstone("subject-of-later").await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !recording.is_finished(),
        "the tombstone waits for the batch"
    );
    sqlx::query("COMMIT").execute(&mut batch).await.unwrap();
    recording.await.unwrap();
}

on_every_store!(
    an_import_writes_each_user_as_an_upsert_would,
    an_erased_person_is_not_imported_again,
    an_import_racing_an_erasure_never_brings_the_person_back,
);
