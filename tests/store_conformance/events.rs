//! The event inbox: ordering, dedup, retries, pruning, and batched customer updates.

use super::*;

/// The ids of a customer's waiting events, in apply order.
async fn queued_ids(store: &dyn Store, customer: &str) -> Vec<String> {
    store
        .customer_events(customer, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event.id)
        .collect()
}

async fn the_event_inbox_orders_dedups_retries_and_prunes(backend: Backend) {
    use billsync::store::{EventOutcome, EventState};
    let Some(t) = backend
        .store("the_event_inbox_orders_dedups_retries_and_prunes")
        .await
    else {
        return;
    };
    let store = &t.store;
    // Duplicates within one batch and across batches are stored once.
    let fresh = store
        .insert_events(&[
            new_event("evt_b", 20, "cus_1"),
            new_event("evt_a", 10, "cus_1"),
            new_event("evt_b", 20, "cus_1"),
        ])
        .await
        .unwrap();
    assert_eq!(fresh, [true, true, false]);
    let fresh = store
        .insert_events(&[
            new_event("evt_a", 10, "cus_1"),
            new_event("evt_c", 20, "cus_1"),
            new_event("evt_z", 5, "cus_2"),
        ])
        .await
        .unwrap();
    assert_eq!(fresh, [false, true, true]);
    assert_eq!(store.list_events(None, 100).await.unwrap().len(), 4);

    // Order: created, then arrival.
    let order = queued_ids(store.as_ref(), "cus_1").await;
    assert_eq!(order, ["evt_a", "evt_b", "evt_c"]);
    // Of a run of customer.updated snapshots only the newest is applied, so only its
    // payload is loaded.
    let payloads = store
        .customer_events("cus_1", 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.payload)
        .collect::<Vec<_>>();
    assert_eq!(
        payloads,
        [None, None, Some("{\"id\":\"evt_c\"}".to_owned())]
    );
    let limited = store.customer_events("cus_1", 2).await.unwrap();
    assert_eq!(
        limited.last().unwrap().payload.as_deref(),
        Some("{\"id\":\"evt_b\"}"),
        "the newest of those loaded is applied, so it comes with its payload"
    );
    let due = store.due_event_customers(10).await.unwrap();
    assert_eq!(due, ["cus_1", "cus_2"]);

    // One applier per customer at a time.
    assert!(store
        .try_lease_customer("cus_1", "a", Duration::from_secs(30))
        .await
        .unwrap());
    assert!(!store
        .try_lease_customer("cus_1", "b", Duration::from_secs(30))
        .await
        .unwrap());
    store.release_customer("cus_1", "a").await.unwrap();
    assert!(store
        .try_lease_customer("cus_1", "b", Duration::from_secs(30))
        .await
        .unwrap());
    // Many at once: those nobody holds, each once.
    let lease = Duration::from_secs(30);
    let ids = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let mut leased = store
        .try_lease_customers(&ids(&["cus_3", "cus_1", "cus_2", "cus_3"]), "c", lease)
        .await
        .unwrap();
    leased.sort();
    assert_eq!(leased, ["cus_2", "cus_3"], "cus_1 is b's");
    store
        .release_customers(&ids(&["cus_1"]), "b")
        .await
        .unwrap();
    store
        .release_customers(&ids(&["cus_2"]), "c")
        .await
        .unwrap();
    let mut leased = store
        .try_lease_customers(&ids(&["cus_1", "cus_2", "cus_3"]), "d", lease)
        .await
        .unwrap();
    leased.sort();
    assert_eq!(leased, ["cus_1", "cus_2"], "cus_3 is still c's");
    store
        .release_customers(&ids(&["cus_1", "cus_2"]), "d")
        .await
        .unwrap();
    store
        .release_customers(&ids(&["cus_3"]), "d")
        .await
        .unwrap();
    assert!(
        store
            .try_lease_customers(&ids(&["cus_3"]), "e", lease)
            .await
            .unwrap()
            .is_empty(),
        "only its holder releases a lease"
    );
    store
        .release_customers(&ids(&["cus_3"]), "c")
        .await
        .unwrap();
    assert!(store
        .try_lease_customer("cus_1", "b", Duration::from_secs(30))
        .await
        .unwrap());

    store
        .finish_event("evt_a", &EventOutcome::Applied)
        .await
        .unwrap();
    store
        .finish_event(
            "evt_b",
            &EventOutcome::Retry {
                delay: Duration::from_secs(60),
                error: "later".into(),
            },
        )
        .await
        .unwrap();
    store
        .finish_event(
            "evt_z",
            &EventOutcome::Failed {
                error: "bad".into(),
            },
        )
        .await
        .unwrap();
    let failed = store
        .list_events(Some(EventState::Failed), 10)
        .await
        .unwrap();
    assert_eq!(failed.len(), 2);
    assert!(failed.iter().all(|e| e.attempts == 1));
    // A retrying event stays in its customer's queue (holding later ones back), a parked one leaves it.
    let queue = store.customer_events("cus_1", 100).await.unwrap();
    assert_eq!(
        queue
            .iter()
            .map(|e| e.event.id.as_str())
            .collect::<Vec<_>>(),
        ["evt_b", "evt_c"]
    );
    assert!(queue[0].next_attempt_at.is_some());
    assert!(store
        .customer_events("cus_2", 100)
        .await
        .unwrap()
        .is_empty());
    assert!(
        store.due_event_customers(10).await.unwrap().is_empty(),
        "evt_c waits behind evt_b's retry; cus_2 is parked"
    );

    assert_eq!(store.replay_failed_events().await.unwrap(), 2);
    assert!(store
        .list_events(Some(EventState::Failed), 10)
        .await
        .unwrap()
        .is_empty());

    assert_eq!(
        store.due_event_customers(10).await.unwrap(),
        ["cus_1", "cus_2"],
        "replayed events are due at once"
    );

    // Pruning keeps what is not finished.
    store
        .finish_events(&["evt_c".into(), "evt_z".into()], &EventOutcome::Applied)
        .await
        .unwrap();
    let pruned = store
        .prune_events(billsync::store::now() + time::Duration::seconds(5))
        .await
        .unwrap();
    assert_eq!(pruned, 3, "evt_a, evt_c and evt_z");
    let left: Vec<String> = store
        .list_events(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, ["evt_b"]);
    assert_eq!(
        store
            .prune_events(billsync::store::now() - time::Duration::days(1))
            .await
            .unwrap(),
        0
    );
}

/// Events parked as failed do not outlive the retention; those waiting for a retry do.
async fn parked_events_are_pruned_after_the_retention(backend: Backend) {
    use billsync::store::EventOutcome;
    let Some(t) = backend
        .store("parked_events_are_pruned_after_the_retention")
        .await
    else {
        return;
    };
    let store = &t.store;
    store
        .insert_events(&[
            new_event("evt_parked", 10, "cus_P"),
            new_event("evt_retrying", 11, "cus_R"),
        ])
        .await
        .unwrap();
    store
        .finish_event(
            "evt_parked",
            &EventOutcome::Failed {
                error: "bad".into(),
            },
        )
        .await
        .unwrap();
    store
        .finish_event(
            "evt_retrying",
            &EventOutcome::Retry {
                delay: Duration::from_secs(600),
                error: "later".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .prune_events(billsync::store::now() - time::Duration::days(1))
            .await
            .unwrap(),
        0,
        "within the retention"
    );
    assert_eq!(
        store
            .prune_events(billsync::store::now() + time::Duration::seconds(5))
            .await
            .unwrap(),
        1
    );
    let left: Vec<String> = store
        .list_events(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, ["evt_retrying"]);
}

/// Where an event stands is its queue row while it waits, what ingest filed once it is done.
async fn event_states_follow_the_queue(backend: Backend) {
    use billsync::store::{EventOutcome, EventState};
    let Some(t) = backend.store("event_states_follow_the_queue").await else {
        return;
    };
    let store = &t.store;
    let mut invoice = new_event("evt_invoice", 2, "cus_1");
    invoice.kind = "invoice.paid".into();
    invoice.state = EventState::Skipped;
    let mut anonymous = new_event("evt_anonymous", 3, "cus_1");
    anonymous.kind = "invoice.paid".into();
    anonymous.customer_id = None;
    anonymous.state = EventState::Skipped;
    store
        .insert_events(&[new_event("evt_update", 1, "cus_1"), invoice, anonymous])
        .await
        .unwrap();
    let ids = |events: Vec<billsync::store::StoredEvent>| {
        events.into_iter().map(|e| e.id).collect::<Vec<_>>()
    };
    let listed = |state| async move { ids(store.list_events(Some(state), 10).await.unwrap()) };
    assert_eq!(listed(EventState::Pending).await, ["evt_update"]);
    assert_eq!(
        listed(EventState::Skipped).await,
        ["evt_anonymous", "evt_invoice"]
    );
    assert!(listed(EventState::Applied).await.is_empty());
    assert_eq!(store.queue_stats().await.unwrap().events_pending, 1);

    // Applied after one failure: the attempt is remembered, the error is not.
    store
        .finish_event(
            "evt_update",
            &EventOutcome::Retry {
                delay: Duration::ZERO,
                error: "stripe down".into(),
            },
        )
        .await
        .unwrap();
    let stats = store.queue_stats().await.unwrap();
    assert_eq!((stats.events_pending, stats.events_failed), (0, 1));
    store
        .finish_event("evt_update", &EventOutcome::Applied)
        .await
        .unwrap();
    let applied = store
        .list_events(Some(EventState::Applied), 10)
        .await
        .unwrap();
    assert_eq!(applied.len(), 1);
    assert_eq!(
        (
            applied[0].id.as_str(),
            applied[0].attempts,
            &applied[0].last_error
        ),
        ("evt_update", 1, &None)
    );
    assert!(listed(EventState::Failed).await.is_empty());
    assert!(store.customer_events("cus_1", 10).await.unwrap().is_empty());

    // Replay queues an event again, from scratch; one with no customer stays skipped.
    let replayed = store.replay_event("evt_update").await.unwrap().unwrap();
    assert_eq!(
        (replayed.state, replayed.attempts),
        (EventState::Pending, 0)
    );
    let replayed = store.replay_event("evt_invoice").await.unwrap().unwrap();
    assert_eq!(replayed.state, EventState::Pending);
    let replayed = store.replay_event("evt_anonymous").await.unwrap().unwrap();
    assert_eq!(replayed.state, EventState::Skipped);
    assert_eq!(store.replay_event("evt_unknown").await.unwrap(), None);
    let queue = queued_ids(store.as_ref(), "cus_1").await;
    assert_eq!(queue, ["evt_update", "evt_invoice"]);
    assert_eq!(store.due_event_customers(10).await.unwrap(), ["cus_1"]);

    // Retention never takes an event that is still waiting.
    store
        .finish_event("evt_update", &EventOutcome::Applied)
        .await
        .unwrap();
    let pruned = store
        .prune_events(billsync::store::now() + time::Duration::seconds(5))
        .await
        .unwrap();
    assert_eq!(pruned, 2, "evt_update and evt_anonymous");
    assert_eq!(
        ids(store.list_events(None, 10).await.unwrap()),
        ["evt_invoice"]
    );
}

/// A fresh store whose database has no schema yet (for upgrade tests).
async fn unmigrated_store(backend: Backend, test: &str) -> Option<support::TestStore> {
    match backend {
        Backend::Sqlite => Some(support::unmigrated_sqlite_store_with(&StoreOptions::new(8)).await),
        Backend::Postgres => {
            support::unmigrated_postgres_store_with(test, &StoreOptions::new(20)).await
        }
    }
}

/// This backend's migration files (`migrations/<backend>`).
fn migrations_dir(backend: Backend) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        })
}

/// An inbox written before the event queue existed keeps every event where it stood.
async fn upgrading_keeps_waiting_events_waiting(backend: Backend) {
    use billsync::store::EventState;
    let Some(t) = unmigrated_store(backend, "upgrading_keeps_waiting_events_waiting").await else {
        return;
    };
    // The schema as it was before the queue: every migration before `*_event_queue.sql`.
    let before = tempfile::tempdir().unwrap();
    let mut files: Vec<_> = std::fs::read_dir(migrations_dir(backend))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    for path in files
        .iter()
        .take_while(|path| !path.to_string_lossy().contains("event_queue"))
    {
        std::fs::copy(path, before.path().join(path.file_name().unwrap())).unwrap();
    }
    let legacy = sqlx::migrate::Migrator::new(before.path()).await.unwrap();
    let received = match backend {
        Backend::Postgres => "now()",
        Backend::Sqlite => "1700000000000",
    };
    let rows = format!(
        "INSERT INTO stripe_events (id, type, created, livemode, stripe_customer_id, payload,
                                    received_at, state, attempts, next_attempt_at, last_error)
         VALUES ('evt_applied', 'customer.updated', 1, FALSE, 'cus_1', '{{}}', {received},
                 'applied', 0, NULL, NULL),
                ('evt_pending', 'customer.updated', 2, FALSE, 'cus_1', '{{}}', {received},
                 'pending', 0, NULL, NULL),
                ('evt_failed', 'customer.updated', 3, FALSE, 'cus_2', '{{}}', {received},
                 'failed', 2, NULL, 'boom'),
                ('evt_orphan', 'customer.updated', 4, FALSE, NULL, '{{}}', {received},
                 'pending', 0, NULL, NULL),
                ('evt_skipped', 'invoice.paid', 5, FALSE, NULL, '{{}}', {received},
                 'skipped', 0, NULL, NULL)"
    );
    match backend {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&t.url).await.unwrap();
            legacy.run(&pool).await.unwrap();
            sqlx::query(&rows).execute(&pool).await.unwrap();
            pool.close().await;
        }
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&t.url).await.unwrap();
            legacy.run(&pool).await.unwrap();
            sqlx::query(&rows).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }

    t.store.migrate().await.unwrap();
    let store = &t.store;
    let listed = |state| async move {
        store
            .list_events(Some(state), 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.attempts, e.last_error))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        listed(EventState::Applied).await,
        [("evt_applied".to_owned(), 0, None)]
    );
    assert_eq!(
        listed(EventState::Pending).await,
        [("evt_pending".to_owned(), 0, None)]
    );
    assert_eq!(
        listed(EventState::Failed).await,
        [("evt_failed".to_owned(), 2, Some("boom".to_owned()))]
    );
    assert_eq!(
        listed(EventState::Skipped).await,
        [
            ("evt_skipped".to_owned(), 0, None),
            ("evt_orphan".to_owned(), 0, None)
        ],
        "a handled event naming no customer had nothing to apply it to"
    );
    assert_eq!(store.due_event_customers(10).await.unwrap(), ["cus_1"]);
    let queue = queued_ids(store.as_ref(), "cus_1").await;
    assert_eq!(queue, ["evt_pending"]);
}

/// The applier's batched path: one read of what it needs for many customers, one
/// transaction for their writes, and a user edited meanwhile left out of it.
async fn customer_updates_are_read_and_written_in_batches(backend: Backend) {
    use billsync::store::{CustomerUpdate, RemoteProfile};
    let Some(t) = backend
        .store("customer_updates_are_read_and_written_in_batches")
        .await
    else {
        return;
    };
    let store = &t.store;
    let mut users = Vec::new();
    for n in 1..=3 {
        let user = store
            .upsert_user(&upsert(&format!("u{n}"), &format!("u{n}@example.com")))
            .await
            .unwrap();
        store
            .insert_link(
                &user.id,
                &cus(&format!("cus_{n}")),
                false,
                LinkSource::Created,
            )
            .await
            .unwrap();
        users.push(user);
    }
    store
        .upsert_user(&upsert("unlinked", "x@example.com"))
        .await
        .unwrap();
    let pushed = PushedProfile {
        email: "u2@example.com".into(),
        name: None,
        phone: None,
        version: 1,
    };
    store.record_push(&users[1].id, &pushed).await.unwrap();
    store
        .insert_events(&[
            new_event("evt_1a", 10, "cus_1"),
            new_event("evt_1b", 12, "cus_1"),
            new_event("evt_2", 12, "cus_2"),
            new_event("evt_3", 13, "cus_3"),
        ])
        .await
        .unwrap();
    store
        .raise_link_watermark("cus_3", 11, "evt_0")
        .await
        .unwrap();

    let ids = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let mut contexts = store
        .update_contexts(&ids(&["cus_1", "cus_2", "cus_3", "cus_nobody"]))
        .await
        .unwrap();
    contexts.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
    assert_eq!(contexts.len(), 3, "only linked customers");
    assert_eq!(contexts[0].user, users[0]);
    assert_eq!(contexts[0].watermark, None);
    assert_eq!(contexts[0].last_push, None);
    assert!(!contexts[0].active_push);
    assert_eq!(contexts[0].pushed_stamp, None);
    assert_eq!(
        contexts[1].pushed_stamp,
        Some(pushed.version),
        "a push records the version it stamped"
    );
    assert_eq!(contexts[1].last_push, Some(pushed));
    assert_eq!(contexts[2].watermark, Some((11, Some("evt_0".to_owned()))));

    let change = |n: usize, email: &str, expected: i64| RemoteProfile {
        user: upsert(&format!("u{}", n + 1), email),
        expected,
        pushed: PushedProfile {
            email: email.to_lowercase(),
            name: None,
            phone: None,
            version: expected,
        },
    };
    let conflicts = store
        .commit_customer_updates(&[
            CustomerUpdate {
                customer_id: "cus_1".into(),
                // As Stripe spells it.
                profile: Some(change(0, "New1@Example.com", users[0].version)),
                watermark: Some((12, "evt_1b".into())),
                events: ids(&["evt_1a", "evt_1b"]),
            },
            CustomerUpdate {
                customer_id: "cus_2".into(),
                profile: Some(change(1, "new2@example.com", users[1].version - 1)),
                watermark: Some((12, "evt_2".into())),
                events: ids(&["evt_2"]),
            },
            CustomerUpdate {
                customer_id: "cus_3".into(),
                profile: None,
                watermark: Some((13, "evt_3".into())),
                events: ids(&["evt_3"]),
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        conflicts,
        ["cus_2"],
        "u2 is not at the version the change was read at"
    );

    let u1 = store.get_user(&users[0].id).await.unwrap().unwrap();
    assert_eq!(u1.email.as_str(), "new1@example.com");
    assert_eq!(u1.email.as_given(), Some("New1@Example.com"));
    assert_eq!(u1.version, users[0].version + 1);
    assert_eq!(
        store
            .last_push(&u1.id)
            .await
            .unwrap()
            .map(|p| (p.email, p.version)),
        Some(("new1@example.com".to_owned(), u1.version)),
        "Stripe's values are recorded, to recognise them when they come back"
    );
    assert_eq!(
        store.link_watermark("cus_1").await.unwrap(),
        Some((12, Some("evt_1b".to_owned())))
    );
    assert!(queued_ids(store.as_ref(), "cus_1").await.is_empty());
    // Stripe's values are not a push of billsync's: no stamp. A push stamps; a later
    // Stripe-side change (which keeps the metadata) keeps that stamp.
    let stamp_of = |customer: &'static str| {
        let store = store.clone();
        async move { store.update_contexts(&ids(&[customer])).await.unwrap()[0].pushed_stamp }
    };
    assert_eq!(stamp_of("cus_1").await, None);
    store
        .record_push(
            &u1.id,
            &PushedProfile {
                email: "new1@example.com".into(),
                name: None,
                phone: None,
                version: u1.version,
            },
        )
        .await
        .unwrap();
    let portal = change(0, "portal1@example.com", u1.version);
    store
        .apply_remote_profile(&portal.user, portal.expected, &portal.pushed)
        .await
        .unwrap()
        .expect("applied");
    assert_eq!(stamp_of("cus_1").await, Some(u1.version));

    assert_eq!(
        store.get_user(&users[1].id).await.unwrap().unwrap(),
        users[1]
    );
    assert_eq!(store.link_watermark("cus_2").await.unwrap(), None);
    assert_eq!(queued_ids(store.as_ref(), "cus_2").await, ["evt_2"]);

    assert_eq!(
        store.link_watermark("cus_3").await.unwrap(),
        Some((13, Some("evt_3".to_owned())))
    );
    assert!(queued_ids(store.as_ref(), "cus_3").await.is_empty());
    let applied = store
        .list_events(Some(billsync::store::EventState::Applied), 10)
        .await
        .unwrap();
    assert_eq!(applied.len(), 3, "{applied:?}");

    // A watermark never goes back.
    store
        .commit_customer_updates(&[CustomerUpdate {
            customer_id: "cus_3".into(),
            profile: None,
            watermark: Some((5, "evt_old".into())),
            events: vec![],
        }])
        .await
        .unwrap();
    assert_eq!(
        store.link_watermark("cus_3").await.unwrap(),
        Some((13, Some("evt_3".to_owned())))
    );
}

/// Stripe may deliver one event twice at once, and billsync's ingestion writers commit
/// concurrent batches: two batches holding the same events, in any order, both commit (on
/// Postgres, rows locked in opposite orders deadlocked, and a whole batch answered 503).
async fn concurrent_batches_of_the_same_events_both_commit(backend: Backend) {
    let Some(t) = backend
        .store("concurrent_batches_of_the_same_events_both_commit")
        .await
    else {
        return;
    };
    for round in 0..5 {
        let ascending: Vec<_> = (0..2_000)
            .map(|i| new_event(&format!("evt_r{round}_{i:04}"), i, "cus_twice"))
            .collect();
        let descending: Vec<_> = ascending.iter().rev().cloned().collect();
        let (up, down) = tokio::join!(
            t.store.insert_events(&ascending),
            t.store.insert_events(&descending)
        );
        let (up, down) = (up.unwrap(), down.unwrap());
        // Each event stored once, by one of the two.
        let fresh = up
            .iter()
            .rev()
            .zip(&down)
            .filter(|(a, b)| **a != **b)
            .count();
        assert_eq!(fresh, 2_000, "round {round}");
    }
}

on_every_store!(
    concurrent_batches_of_the_same_events_both_commit,
    customer_updates_are_read_and_written_in_batches,
    event_states_follow_the_queue,
    parked_events_are_pruned_after_the_retention,
    upgrading_keeps_waiting_events_waiting,
    the_event_inbox_orders_dedups_retries_and_prunes,
);
