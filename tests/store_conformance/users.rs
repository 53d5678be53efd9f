//! Users: profiles, versions, spellings, and the profile pushes their changes queue.

use super::*;

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

/// The address as it was given is kept beside the normalised one (resolve lists both); a
/// new spelling of the same address is not a change, a new address replaces the spelling.
async fn an_emails_spelling_is_kept_with_it(backend: Backend) {
    let Some(t) = backend.store("an_emails_spelling_is_kept_with_it").await else {
        return;
    };
    let store = &t.store;
    let spelling = |user: &billsync::store::User| user.email.as_given().map(str::to_owned);
    let created = store
        .upsert_user(&upsert("spelt", "Ada@Example.com"))
        .await
        .unwrap();
    assert_eq!(created.email.as_str(), "ada@example.com");
    assert_eq!(spelling(&created).as_deref(), Some("Ada@Example.com"));
    let read = store.get_user(&created.id).await.unwrap().unwrap();
    assert_eq!(spelling(&read).as_deref(), Some("Ada@Example.com"));

    let respelt = store
        .upsert_user(&upsert("spelt", "ADA@example.com"))
        .await
        .unwrap();
    assert_eq!(respelt.version, 1, "the same address is no change");
    assert_eq!(spelling(&respelt).as_deref(), Some("Ada@Example.com"));

    let moved = store
        .upsert_user(&upsert("spelt", "new@example.com"))
        .await
        .unwrap();
    assert_eq!(moved.version, 2);
    assert_eq!(
        spelling(&moved),
        None,
        "the old spelling went with the old address"
    );

    let edited = store
        .update_user_if_version(&upsert("spelt", "Grace@Example.com"), moved.version)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(spelling(&edited).as_deref(), Some("Grace@Example.com"));
    let read = store.get_user(&created.id).await.unwrap().unwrap();
    assert_eq!(spelling(&read).as_deref(), Some("Grace@Example.com"));
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

async fn profile_changes_queue_one_coalesced_push(backend: Backend) {
    let Some(t) = backend
        .store("profile_changes_queue_one_coalesced_push")
        .await
    else {
        return;
    };
    let store = &t.store;
    // A new user has no customer yet: nothing to push.
    let created = store
        .upsert_user(&upsert("pusher", "p@example.com"))
        .await
        .unwrap();
    assert!(store.list_jobs(None, 10).await.unwrap().is_empty());

    // Three changes in a row: one pending push.
    for name in ["A", "B", "C"] {
        store
            .upsert_user(&UserUpsert {
                first_name: PersonName::parse_optional(Some(name), "f").unwrap(),
                ..upsert("pusher", "p@example.com")
            })
            .await
            .unwrap();
    }
    let jobs = store.list_jobs(Some(JobState::Pending), 10).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].kind, JobKind::PushProfile);
    assert_eq!(jobs[0].user_id, "pusher");
    // Not due before the debounce.
    assert!(store
        .claim_jobs(10, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());

    // Optimistic update: the stale version loses, the current one wins.
    let current = store.get_user(&created.id).await.unwrap().unwrap();
    assert_eq!(current.version, 4);
    let change = UserUpsert {
        phone: Some(Phone::parse("+14155550123").unwrap()),
        ..upsert("pusher", "p@example.com")
    };
    assert_eq!(
        store.update_user_if_version(&change, 3).await.unwrap(),
        None
    );
    let updated = store
        .update_user_if_version(&change, 4)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.version, 5);
    // Same values at the current version: unchanged, no bump.
    let same = store
        .update_user_if_version(&change, 5)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(same.version, 5);
    assert_eq!(
        store.list_jobs(None, 10).await.unwrap().len(),
        1,
        "still one push"
    );

    after_debounce().await;
    let claimed = store.claim_jobs(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].state, JobState::InFlight);
    assert_eq!(claimed[0].attempts, 1);
    // In flight: another worker gets nothing.
    assert!(store
        .claim_jobs(10, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());

    // An edit while the push is in flight queues a new one, which waits for the first.
    store
        .upsert_user(&upsert("pusher", "new@example.com"))
        .await
        .unwrap();
    after_debounce().await;
    assert!(store
        .claim_jobs(10, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    // The first one failing now is superseded by the newer pending push.
    store
        .finish_job(
            &claimed[0],
            &JobOutcome::Retry {
                delay: Duration::ZERO,
                error: "stripe unavailable".into(),
            },
        )
        .await
        .unwrap();
    let first = store.get_job(claimed[0].id).await.unwrap().unwrap();
    assert_eq!(first.state, JobState::Done, "superseded");
    let next = store.claim_jobs(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_ne!(next[0].id, claimed[0].id);
}

on_every_store!(
    an_emails_spelling_is_kept_with_it,
    profile_changes_queue_one_coalesced_push,
    users_round_trip_and_version_counts_changes,
    hostile_strings_are_data,
);
