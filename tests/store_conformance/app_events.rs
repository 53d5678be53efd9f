//! The app-event outbox: positions that never let a reader skip, one event per key in flight,
//! fenced finishes, retries, parking and redelivery.

use billsync::domain::{AppEvent, AppEventOutcome, AppEventState};
use time::OffsetDateTime;

use super::*;

/// Changes `user`'s first name, which writes one `user.updated`.
async fn rename(store: &dyn Store, user: &str, name: &str) {
    let mut change = upsert(user, &format!("{user}@example.com"));
    change.first_name = PersonName::parse_optional(Some(name), "first_name").unwrap();
    store.upsert_user(&change).await.unwrap();
}

async fn sequenced_after(store: &dyn Store, after: i64) -> Vec<AppEvent> {
    store.sequence_app_events(1_000).await.unwrap();
    store.app_events_after(after, 1_000).await.unwrap()
}

fn names(events: &[AppEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e.key,
                e.data["user"]["first_name"].as_str().unwrap_or("-")
            )
        })
        .collect()
}

const LEASE: Duration = Duration::from_secs(30);

async fn each_key_has_one_event_in_flight_and_finishes_are_fenced(backend: Backend) {
    let Some(t) = backend
        .store("each_key_has_one_event_in_flight_and_finishes_are_fenced")
        .await
    else {
        return;
    };
    let store = t.store.as_ref();
    for user in ["a", "b"] {
        store
            .upsert_user(&upsert(user, &format!("{user}@example.com")))
            .await
            .unwrap();
        rename(store, user, "One").await;
        rename(store, user, "Two").await;
    }
    assert_eq!(
        names(&sequenced_after(store, 0).await),
        ["a:One", "a:Two", "b:One", "b:Two"]
    );

    let first = store.claim_app_events(10, 1, LEASE).await.unwrap();
    assert_eq!(names(&first), ["a:One", "b:One"], "only each key's first");
    assert!(first
        .iter()
        .all(|e| e.attempts == 1 && e.claim_token.is_some()));
    assert!(
        store
            .claim_app_events(10, 1, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "heads are held"
    );

    let (a_one, b_one) = (&first[0], &first[1]);
    store
        .finish_app_events(&[(a_one.clone(), AppEventOutcome::Delivered)])
        .await
        .unwrap();
    assert_eq!(
        names(&store.claim_app_events(10, 1, LEASE).await.unwrap()),
        ["a:Two"]
    );

    // b's claim runs out and is taken again: the first claim's finish changes nothing.
    let retry_at = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    store
        .finish_app_events(&[(
            b_one.clone(),
            AppEventOutcome::Retry {
                at: retry_at,
                error: "the receiver answered 500".into(),
            },
        )])
        .await
        .unwrap();
    let again = store.claim_app_events(10, 1, LEASE).await.unwrap();
    assert_eq!(names(&again), ["b:One"]);
    assert_eq!(again[0].attempts, 2);
    assert_eq!(
        again[0].last_error.as_deref(),
        Some("the receiver answered 500")
    );
    store
        .finish_app_events(&[(b_one.clone(), AppEventOutcome::Delivered)])
        .await
        .unwrap();
    let pending = store
        .list_app_events(AppEventState::Pending, 10)
        .await
        .unwrap();
    assert!(
        pending.iter().any(|e| e.id == b_one.id),
        "a stale claim delivered nothing"
    );

    // Parked: it no longer holds its key's next event back; redelivered, it is first again.
    store
        .finish_app_events(&[(
            again[0].clone(),
            AppEventOutcome::Failed {
                error: "gone".into(),
            },
        )])
        .await
        .unwrap();
    let failed = store
        .list_app_events(AppEventState::Failed, 10)
        .await
        .unwrap();
    assert_eq!(names(&failed), ["b:One"]);
    assert_eq!(
        names(&store.claim_app_events(10, 1, LEASE).await.unwrap()),
        ["b:Two"]
    );
    let redelivered = store.redeliver_app_event(&b_one.id).await.unwrap().unwrap();
    assert_eq!(
        (redelivered.state, redelivered.attempts),
        (AppEventState::Pending, 0)
    );
    assert_eq!(store.redeliver_app_event("msg_none").await.unwrap(), None);
    assert_eq!(
        store.app_event_backlog().await.unwrap().0,
        3,
        "a:Two, b:One, b:Two"
    );

    // A retry waits for its time.
    let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
    let head = store.claim_app_events(10, 1, LEASE).await.unwrap();
    assert_eq!(names(&head), ["b:One"], "a:Two and b:Two are held");
    let wait = AppEventOutcome::Retry {
        at: later,
        error: "timed out".into(),
    };
    store
        .finish_app_events(&[(head[0].clone(), wait)])
        .await
        .unwrap();
    assert!(store
        .claim_app_events(10, 1, LEASE)
        .await
        .unwrap()
        .is_empty());
}

async fn old_events_are_pruned_but_undelivered_ones_stay(backend: Backend) {
    let Some(t) = backend
        .store("old_events_are_pruned_but_undelivered_ones_stay")
        .await
    else {
        return;
    };
    let store = t.store.as_ref();
    store
        .upsert_user(&upsert("p", "p@example.com"))
        .await
        .unwrap();
    rename(store, "p", "One").await;
    rename(store, "p", "Two").await;
    sequenced_after(store, 0).await;
    let claimed = store.claim_app_events(10, 1, LEASE).await.unwrap();
    store
        .finish_app_events(&[(claimed[0].clone(), AppEventOutcome::Delivered)])
        .await
        .unwrap();
    let future = OffsetDateTime::now_utc() + time::Duration::minutes(1);
    assert_eq!(
        store.prune_app_events(future, false).await.unwrap(),
        1,
        "the delivered one"
    );
    assert_eq!(
        names(&store.app_events_after(0, 10).await.unwrap()),
        ["p:Two"]
    );
    assert_eq!(
        store.prune_app_events(future, true).await.unwrap(),
        1,
        "nothing delivers it"
    );
    // Positions keep rising after everything was pruned: a reader's cursor stays valid.
    rename(store, "p", "Three").await;
    let after = sequenced_after(store, 2).await;
    assert_eq!(names(&after), ["p:Three"]);
    assert_eq!(after[0].position, 3);
}

/// The heads a claim reads, and what they must be: each key's first pending positioned event.
async fn heads_and_truth(url: &str) -> (Vec<(String, i64)>, Vec<(String, i64)>) {
    const HEADS: &str = "SELECT event_key, position FROM app_event_heads ORDER BY event_key";
    const TRUTH: &str = "SELECT event_key, min(position) FROM app_events
        WHERE state = 'pending' AND position IS NOT NULL GROUP BY event_key ORDER BY event_key";
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        let heads = sqlx::query_as(HEADS).fetch_all(&pool).await.unwrap();
        let truth = sqlx::query_as(TRUTH).fetch_all(&pool).await.unwrap();
        (heads, truth)
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let heads = sqlx::query_as(HEADS).fetch_all(&pool).await.unwrap();
        let truth = sqlx::query_as(TRUTH).fetch_all(&pool).await.unwrap();
        (heads, truth)
    }
}

async fn assert_heads_exact(url: &str, after: &str) -> usize {
    let (heads, truth) = heads_and_truth(url).await;
    assert_eq!(heads, truth, "heads after {after}");
    heads.len()
}

/// Every change to a key's pending events keeps its head on its first pending event: a claim
/// reads nothing else, so a head left behind would hold that user's events forever.
async fn each_change_keeps_the_heads_exact(backend: Backend) {
    let Some(t) = backend.store("each_change_keeps_the_heads_exact").await else {
        return;
    };
    let store = t.store.as_ref();
    for user in ["a", "b", "c"] {
        store
            .upsert_user(&upsert(user, &format!("{user}@example.com")))
            .await
            .unwrap();
        rename(store, user, "One").await;
    }
    assert_eq!(
        assert_heads_exact(&t.url, "writes not yet positioned").await,
        0
    );
    sequenced_after(store, 0).await;
    assert_eq!(assert_heads_exact(&t.url, "positioning").await, 3);
    rename(store, "a", "Two").await;
    sequenced_after(store, 0).await;
    assert_heads_exact(&t.url, "positioning behind a head").await;

    let claimed = store.claim_app_events(10, 1, LEASE).await.unwrap();
    assert_eq!(names(&claimed), ["a:One", "b:One", "c:One"]);
    let retry = AppEventOutcome::Retry {
        at: OffsetDateTime::now_utc() - time::Duration::seconds(1),
        error: "timed out".into(),
    };
    let parked = AppEventOutcome::Failed {
        error: "gone".into(),
    };
    store
        .finish_app_events(&[
            (claimed[0].clone(), AppEventOutcome::Delivered),
            (claimed[1].clone(), retry),
            (claimed[2].clone(), parked),
        ])
        .await
        .unwrap();
    assert_eq!(
        assert_heads_exact(&t.url, "a delivery, a retry, a parking").await,
        2
    );

    // A stale claim's finish (its lease ran out, another took it) moves nothing wrongly.
    store
        .finish_app_events(&[(claimed[0].clone(), AppEventOutcome::Delivered)])
        .await
        .unwrap();
    assert_heads_exact(&t.url, "a stale finish").await;

    store.redeliver_app_event(&claimed[2].id).await.unwrap();
    assert_eq!(assert_heads_exact(&t.url, "a redelivery").await, 3);
    store.redeliver_app_event(&claimed[0].id).await.unwrap();
    assert_heads_exact(&t.url, "a redelivery behind a head").await;
    assert_eq!(
        names(&store.claim_app_events(10, 1, LEASE).await.unwrap()),
        ["a:One", "b:One", "c:One"],
        "a's redelivered first event goes before its later one"
    );

    store
        .erase_user(
            &UserId::parse("b").unwrap(),
            None,
            "subject-b",
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    sequenced_after(store, 0).await;
    assert_heads_exact(&t.url, "an erasure").await;

    let future = OffsetDateTime::now_utc() + time::Duration::minutes(1);
    store.prune_app_events(future, true).await.unwrap();
    assert_eq!(
        assert_heads_exact(&t.url, "pruning pending events").await,
        0
    );
}

/// A claim takes each key's next events as one run (up to `per_key`); what the deliverer
/// hands back unsent goes back as it was, attempts uncounted, and a run never starts past a
/// key's first pending event that is not due.
async fn a_claim_takes_each_keys_next_events_as_one_run(backend: Backend) {
    let Some(t) = backend
        .store("a_claim_takes_each_keys_next_events_as_one_run")
        .await
    else {
        return;
    };
    let store = t.store.as_ref();
    for (user, renames) in [("a", &["One", "Two", "Three"][..]), ("b", &["One"][..])] {
        store
            .upsert_user(&upsert(user, &format!("{user}@example.com")))
            .await
            .unwrap();
        for name in renames {
            rename(store, user, name).await;
        }
    }
    sequenced_after(store, 0).await;
    let run = store.claim_app_events(10, 2, LEASE).await.unwrap();
    assert_eq!(
        names(&run),
        ["a:One", "a:Two", "b:One"],
        "two of a's, b's one"
    );
    assert!(run
        .iter()
        .all(|e| e.attempts == 1 && e.claim_token.is_some()));
    assert!(
        store
            .claim_app_events(10, 5, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "a:Three waits behind a's claimed run"
    );
    store
        .finish_app_events(&[
            (run[0].clone(), AppEventOutcome::Delivered),
            (run[1].clone(), AppEventOutcome::Released),
            (run[2].clone(), AppEventOutcome::Delivered),
        ])
        .await
        .unwrap();
    assert_heads_exact(&t.url, "a run with one handed back").await;

    let next = store.claim_app_events(10, 5, LEASE).await.unwrap();
    assert_eq!(names(&next), ["a:Two", "a:Three"]);
    assert_eq!(next[0].attempts, 1, "the handed-back claim did not count");
    let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
    store
        .finish_app_events(&[
            (
                next[0].clone(),
                AppEventOutcome::Retry {
                    at: later,
                    error: "the receiver answered 500".into(),
                },
            ),
            (next[1].clone(), AppEventOutcome::Released),
        ])
        .await
        .unwrap();
    assert_heads_exact(&t.url, "a retry with the rest handed back").await;
    assert!(
        store
            .claim_app_events(10, 5, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "a:Three is not sent while a:Two waits for its retry"
    );
    assert_eq!(store.app_event_backlog().await.unwrap().0, 2);

    // A holder that died: once its lease on the head ran out, the next claimer takes the
    // whole run again, followers included, though their own leases were taken a moment later.
    let c = "c";
    store
        .upsert_user(&upsert(c, "c@example.com"))
        .await
        .unwrap();
    for name in ["One", "Two", "Three"] {
        rename(store, c, name).await;
    }
    sequenced_after(store, 0).await;
    let of_c = |events: Vec<AppEvent>| -> Vec<AppEvent> {
        events.into_iter().filter(|e| e.key == c).collect()
    };
    let dead = of_c(
        store
            .claim_app_events(10, 5, Duration::from_millis(1))
            .await
            .unwrap(),
    );
    assert_eq!(names(&dead), ["c:One", "c:Two", "c:Three"]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let taken_over = of_c(store.claim_app_events(10, 5, LEASE).await.unwrap());
    assert_eq!(names(&taken_over), ["c:One", "c:Two", "c:Three"]);
    assert!(taken_over.iter().all(|e| e.attempts == 2));
    assert_heads_exact(&t.url, "a run taken over").await;
}

on_every_store!(
    each_key_has_one_event_in_flight_and_finishes_are_fenced,
    old_events_are_pruned_but_undelivered_ones_stay,
    each_change_keeps_the_heads_exact,
    a_claim_takes_each_keys_next_events_as_one_run,
);

/// Writers, two sequencers and two deliverers at once on Postgres (READ COMMITTED, row locks):
/// a finisher moving a key's head while a sequencer positions that key's next events must
/// never leave the key without a head. Every event is delivered, each key's in order, and
/// nothing is left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_heads_survive_concurrent_writers_sequencers_and_deliverers() {
    let Some(t) = Backend::Postgres
        .store("postgres_heads_survive_concurrent_writers_sequencers_and_deliverers")
        .await
    else {
        return;
    };
    const USERS: usize = 8;
    const RENAMES: usize = 40;
    for u in 0..USERS {
        t.store
            .upsert_user(&upsert(&format!("u{u}"), &format!("u{u}@example.com")))
            .await
            .unwrap();
    }
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut writers = tokio::task::JoinSet::new();
    for u in 0..USERS {
        let store = t.store.clone();
        writers.spawn(async move {
            for n in 0..RENAMES {
                rename(store.as_ref(), &format!("u{u}"), &format!("N{n:03}")).await;
            }
        });
    }
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let store = t.store.clone();
        let writing = writing.clone();
        workers.spawn(async move {
            let mut delivered: Vec<AppEvent> = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                store.sequence_app_events(7).await.unwrap();
                // Runs of up to four per key; of a run longer than two, the last is handed
                // back unsent, as a deliverer does when its lease runs short.
                let claimed = store.claim_app_events(5, 4, LEASE).await.unwrap();
                let done = claimed.is_empty();
                let mut finished = Vec::new();
                for (i, event) in claimed.iter().enumerate() {
                    let run = claimed.iter().filter(|e| e.key == event.key).count();
                    let last = !claimed[i + 1..].iter().any(|e| e.key == event.key);
                    let outcome = if run > 2 && last {
                        AppEventOutcome::Released
                    } else {
                        AppEventOutcome::Delivered
                    };
                    finished.push((event.clone(), outcome));
                }
                store.finish_app_events(&finished).await.unwrap();
                delivered.extend(
                    finished
                        .into_iter()
                        .filter(|(_, o)| *o == AppEventOutcome::Delivered)
                        .map(|(e, _)| e),
                );
                if done && !writing.load(std::sync::atomic::Ordering::SeqCst) {
                    let (pending, _) = store.app_event_backlog().await.unwrap();
                    if pending == 0 {
                        return delivered;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{pending} events are pending and none can be claimed: a key lost its head"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut delivered = Vec::new();
    while let Some(done) = workers.join_next().await {
        delivered.extend(done.unwrap());
    }
    assert_eq!(delivered.len(), USERS * RENAMES, "each event once");
    delivered.sort_by_key(|e| e.position);
    for u in 0..USERS {
        let key = format!("u{u}");
        let renames: Vec<&str> = delivered
            .iter()
            .filter(|e| e.key == key)
            .filter_map(|e| e.data["user"]["first_name"].as_str())
            .collect();
        let expected: Vec<String> = (0..RENAMES).map(|n| format!("N{n:03}")).collect();
        assert_eq!(renames, expected, "{key}'s events in commit order");
    }
    assert_eq!(assert_heads_exact(&t.url, "everything delivered").await, 0);
}

/// The trap of id cursors: a transaction that took an earlier id commits after a later one.
/// Its event gets the next position when it commits, so a reader past the later one still
/// sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_late_commit_is_not_skipped() {
    let Some(t) = Backend::Postgres
        .store("postgres_a_late_commit_is_not_skipped")
        .await
    else {
        return;
    };
    let store = t.store.as_ref();
    use sqlx::Connection;
    let mut late = sqlx::PgConnection::connect(&t.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut late).await.unwrap();
    sqlx::query(
        "INSERT INTO app_events (id, type, event_key, data, created_at, next_attempt_at)
         VALUES ('msg_late', 'user.updated', 'late', '{}', now(), now())",
    )
    .execute(&mut late)
    .await
    .unwrap();
    store
        .upsert_user(&upsert("early", "early@example.com"))
        .await
        .unwrap();
    rename(store, "early", "One").await;
    let seen = sequenced_after(store, 0).await;
    assert_eq!(names(&seen), ["early:One"]);
    let cursor = seen[0].position;

    sqlx::query("COMMIT").execute(&mut late).await.unwrap();
    let next = sequenced_after(store, cursor).await;
    assert_eq!(next.len(), 1, "the late commit is after the cursor");
    assert_eq!(next[0].id, "msg_late");
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM app_events ORDER BY position")
        .fetch_all(&mut late)
        .await
        .unwrap();
    assert!(
        seqs[0] > seqs[1],
        "it took the earlier id, and still was not skipped: {seqs:?}"
    );
}
