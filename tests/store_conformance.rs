//! One conformance suite, run against every store backend.

mod support;

use std::{sync::Arc, time::Duration};

use billsync::store::prelude::*;
use billsync::{
    domain::{Email, LinkSource, PersonName, Phone, StripeCustomerId, UserId},
    store::{
        Erased, EventToApply, JobKind, JobOutcome, JobState, LinkOutcome, PushedProfile, Store,
        StoreError, StoreResult, SubscriptionMirror, UserUpsert,
    },
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

/// One-customer forms of the batch methods, as the suite asserts them; written on the live
/// batch methods, which the store no longer duplicates.
trait OneCustomer {
    async fn customer_events(&self, customer: &str, limit: u32) -> StoreResult<Vec<EventToApply>>;
    async fn try_lease_customer(
        &self,
        customer: &str,
        holder: &str,
        lease: Duration,
    ) -> StoreResult<bool>;
    async fn release_customer(&self, customer: &str, holder: &str) -> StoreResult<()>;
    async fn link_watermark(&self, customer: &str) -> StoreResult<Option<(i64, Option<String>)>>;
}

impl<S: Store + ?Sized> OneCustomer for S {
    async fn customer_events(&self, customer: &str, limit: u32) -> StoreResult<Vec<EventToApply>> {
        let mut found = self.customers_events(&[customer.to_owned()], limit).await?;
        Ok(found.pop().map(|(_, events)| events).unwrap_or_default())
    }
    async fn try_lease_customer(
        &self,
        customer: &str,
        holder: &str,
        lease: Duration,
    ) -> StoreResult<bool> {
        let leased = self
            .try_lease_customers(&[customer.to_owned()], holder, lease)
            .await?;
        Ok(!leased.is_empty())
    }
    async fn release_customer(&self, customer: &str, holder: &str) -> StoreResult<()> {
        self.release_customers(&[customer.to_owned()], holder).await
    }
    /// The applier reads a link's watermark with its update context.
    async fn link_watermark(&self, customer: &str) -> StoreResult<Option<(i64, Option<String>)>> {
        let mut contexts = self.update_contexts(&[customer.to_owned()]).await?;
        Ok(contexts.pop().and_then(|c| c.watermark))
    }
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

/// Waits out the push debounce (300 ms by default).
async fn after_debounce() {
    tokio::time::sleep(Duration::from_millis(350)).await;
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

async fn jobs_retry_fail_and_are_requeued(backend: Backend) {
    let Some(t) = backend.store("jobs_retry_fail_and_are_requeued").await else {
        return;
    };
    let store = &t.store;
    store
        .upsert_user(&upsert("r", "r@example.com"))
        .await
        .unwrap();
    store
        .upsert_user(&upsert("r", "r2@example.com"))
        .await
        .unwrap();
    after_debounce().await;
    let job = store
        .claim_jobs(1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    store
        .finish_job(
            &job,
            &JobOutcome::Retry {
                delay: Duration::from_secs(60),
                error: "429".into(),
            },
        )
        .await
        .unwrap();
    let waiting = store.get_job(job.id).await.unwrap().unwrap();
    assert_eq!(waiting.state, JobState::Pending);
    assert_eq!(waiting.last_error.as_deref(), Some("429"));
    assert!(
        store
            .claim_jobs(1, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty(),
        "backing off"
    );
    // An operator can run it now; it fails for good.
    let claimed = store
        .claim_job(job.id, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.attempts, 2);
    assert_eq!(
        store
            .claim_job(job.id, Duration::from_secs(30))
            .await
            .unwrap(),
        None
    );
    store
        .finish_job(
            &claimed,
            &JobOutcome::Failed {
                error: "customer gone".into(),
            },
        )
        .await
        .unwrap();
    let failed = store.list_jobs(Some(JobState::Failed), 10).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].last_error.as_deref(), Some("customer gone"));
    assert!(store
        .list_jobs(Some(JobState::Pending), 10)
        .await
        .unwrap()
        .is_empty());

    let requeued = store.retry_job(job.id).await.unwrap().unwrap();
    assert_eq!((requeued.state, requeued.attempts), (JobState::Pending, 0));
    assert_eq!(
        store.retry_job(job.id).await.unwrap(),
        None,
        "only failed jobs"
    );
    assert_eq!(store.retry_job(987_654).await.unwrap(), None);
    let again = store.claim_jobs(1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(again[0].id, job.id);
    store
        .finish_job(&again[0], &JobOutcome::Done)
        .await
        .unwrap();
    assert_eq!(
        store.get_job(job.id).await.unwrap().unwrap().state,
        JobState::Done
    );
}

async fn expired_job_leases_are_reclaimed(backend: Backend) {
    let Some(t) = backend.store("expired_job_leases_are_reclaimed").await else {
        return;
    };
    let store = &t.store;
    store
        .upsert_user(&upsert("k", "k@example.com"))
        .await
        .unwrap();
    store
        .upsert_user(&upsert("k", "k2@example.com"))
        .await
        .unwrap();
    after_debounce().await;
    // A worker claims the job and dies.
    let lost = store
        .claim_jobs(1, Duration::from_millis(100))
        .await
        .unwrap()
        .remove(0);
    assert!(store
        .claim_jobs(1, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    tokio::time::sleep(Duration::from_millis(250)).await;
    let resumed = store.claim_jobs(1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].id, lost.id);
    assert_eq!(resumed[0].attempts, 2);
}

/// A worker whose lease ran out and whose job another worker re-claimed can no longer write
/// it: its finish and its progress are refused, and the new holder's are kept.
async fn a_stale_claim_cannot_finish_or_rewrite_its_job(backend: Backend) {
    let Some(t) = backend
        .store("a_stale_claim_cannot_finish_or_rewrite_its_job")
        .await
    else {
        return;
    };
    let store = &t.store;
    store
        .upsert_user(&upsert("fenced", "f@example.com"))
        .await
        .unwrap();
    store
        .upsert_user(&upsert("fenced", "f2@example.com"))
        .await
        .unwrap();
    after_debounce().await;
    let stale = store
        .claim_jobs(1, Duration::from_millis(100))
        .await
        .unwrap()
        .remove(0);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let current = store
        .claim_jobs(1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(current.id, stale.id);
    assert!(current.claim_token.is_some());
    assert_ne!(
        current.claim_token, stale.claim_token,
        "a new token per claim"
    );

    assert!(!store
        .save_job_payload(&stale, &serde_json::json!({"stale": true}))
        .await
        .unwrap());
    for outcome in [
        JobOutcome::Done,
        JobOutcome::Failed {
            error: "stale".into(),
        },
        JobOutcome::Retry {
            delay: Duration::ZERO,
            error: "stale".into(),
        },
    ] {
        assert!(!store.finish_job(&stale, &outcome).await.unwrap());
    }
    let row = store.get_job(stale.id).await.unwrap().unwrap();
    assert_eq!(
        row.state,
        JobState::InFlight,
        "the stale finish was refused"
    );
    assert_eq!(row.claim_token, current.claim_token);
    assert_eq!(row.payload, serde_json::json!({}));
    assert_eq!(row.last_error, None);

    assert!(store
        .save_job_payload(&current, &serde_json::json!({"step": 1}))
        .await
        .unwrap());
    assert!(store.finish_job(&current, &JobOutcome::Done).await.unwrap());
    let row = store.get_job(stale.id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Done);
    assert_eq!(row.payload, serde_json::json!({"step": 1}));
    // Finished: a second finish by the same claim changes nothing either.
    assert!(!store
        .finish_job(
            &current,
            &JobOutcome::Failed {
                error: "late".into()
            }
        )
        .await
        .unwrap());
}

async fn concurrent_workers_claim_each_job_once(backend: Backend) {
    let Some(t) = backend
        .store("concurrent_workers_claim_each_job_once")
        .await
    else {
        return;
    };
    for i in 0..20 {
        let id = format!("w{i}");
        t.store
            .upsert_user(&upsert(&id, "w@example.com"))
            .await
            .unwrap();
        t.store
            .upsert_user(&upsert(&id, "w2@example.com"))
            .await
            .unwrap();
    }
    after_debounce().await;
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let store = t.store.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = store.claim_jobs(3, Duration::from_secs(30)).await.unwrap();
                    if batch.is_empty() {
                        return mine;
                    }
                    mine.extend(batch.into_iter().map(|j| j.id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 20, "every job claimed");
    assert_eq!(unique.len(), 20, "no job claimed twice");
}

async fn erasure_removes_the_user_and_keeps_no_personal_data(backend: Backend) {
    let Some(t) = backend
        .store("erasure_removes_the_user_and_keeps_no_personal_data")
        .await
    else {
        return;
    };
    let store = &t.store;
    let user = UserId::parse("erase-me").unwrap();
    store
        .upsert_user(&upsert("erase-me", "e@example.com"))
        .await
        .unwrap();
    store
        .upsert_user(&upsert("erase-me", "e2@example.com"))
        .await
        .unwrap();
    store
        .insert_link(&user, &cus("cus_E"), false, LinkSource::Created)
        .await
        .unwrap();
    store
        .insert_usage_record(&user, "api_calls", 3, billsync::store::now())
        .await
        .unwrap();
    let payload = serde_json::json!({"customer_id": "cus_E"});
    let job = store.enqueue_erase(&user, &payload).await.unwrap();
    assert_eq!(job.kind, JobKind::Erase);
    assert_eq!(
        store.enqueue_erase(&user, &payload).await.unwrap().id,
        job.id,
        "one at a time"
    );
    assert_eq!(store.active_erase(&user).await.unwrap().unwrap().id, job.id);
    assert!(
        store
            .claim_jobs(10, Duration::from_secs(30))
            .await
            .unwrap()
            .iter()
            .all(|j| j.id != job.id),
        "workers leave a fresh erasure to the request that queued it"
    );
    let claimed = store
        .claim_job(job.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claimed.as_ref().map(|j| j.id), Some(job.id));
    assert!(store
        .save_job_payload(
            claimed.as_ref().unwrap(),
            &serde_json::json!({"done": ["customer"]})
        )
        .await
        .unwrap());
    assert_eq!(
        store.get_job(job.id).await.unwrap().unwrap().payload,
        serde_json::json!({"done": ["customer"]})
    );

    // The customer's stored webhooks go with the erasure; another customer's stay.
    store
        .insert_events(&[
            new_event("evt_E1", 10, "cus_E"),
            new_event("evt_E2", 11, "cus_E"),
            new_event("evt_O1", 12, "cus_O"),
        ])
        .await
        .unwrap();
    store
        .finish_event(
            "evt_E2",
            &billsync::store::EventOutcome::Failed {
                error: "parked".into(),
            },
        )
        .await
        .unwrap();
    // A plan made before the link (or naming another customer) is re-made: nothing deleted.
    for planned in [None, Some("cus_OTHER")] {
        assert_eq!(
            store
                .erase_user(&user, planned, "hash123", &serde_json::json!({}))
                .await
                .unwrap(),
            Erased::Relinked("cus_E".into())
        );
        assert!(store.get_user(&user).await.unwrap().is_some());
        assert!(store.get_link(&user).await.unwrap().is_some());
    }
    assert_eq!(
        store
            .erase_user(
                &user,
                Some("cus_E"),
                "hash123",
                &serde_json::json!({"delete_from_stripe": true})
            )
            .await
            .unwrap(),
        Erased::Done(true)
    );
    assert_eq!(store.get_user(&user).await.unwrap(), None);
    assert_eq!(store.get_link(&user).await.unwrap(), None);
    assert_eq!(
        store.get_link_by_customer(&cus("cus_E")).await.unwrap(),
        None
    );
    let events: Vec<String> = store
        .list_events(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        events,
        ["evt_O1"],
        "no stored webhook of the erased customer"
    );
    assert!(store.customer_events("cus_E", 10).await.unwrap().is_empty());
    assert!(store
        .usage_records_page(&user, 0, 10)
        .await
        .unwrap()
        .is_empty());
    let jobs = store.list_jobs(None, 10).await.unwrap();
    assert!(
        jobs.iter().all(|j| j.user_id == "erased:hash123"),
        "{jobs:?}"
    );
    assert!(
        jobs.iter().all(|j| j.kind == JobKind::Erase),
        "pending pushes dropped: {jobs:?}"
    );
    let audit = store.audit_for_subject("hash123").await.unwrap();
    assert_eq!(audit.last().unwrap().action, "account_erased");
    assert!(!format!("{audit:?}").contains("erase-me"));
    assert!(!format!("{audit:?}").contains("e2@example.com"));
    // Again: nothing left to erase.
    assert_eq!(
        store
            .erase_user(&user, None, "hash123", &serde_json::json!({}))
            .await
            .unwrap(),
        Erased::Done(false)
    );
}

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
            id: Some("si_1".into()),
            price_id: Some("price_1".into()),
            quantity: Some(1),
            current_period_end: Some(1_900_000_000),
        },
        billsync::store::SubscriptionItemMirror {
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

fn new_event(id: &str, created: i64, customer: &str) -> billsync::store::NewEvent {
    billsync::store::NewEvent {
        id: id.into(),
        kind: "customer.updated".into(),
        created,
        livemode: false,
        customer_id: Some(customer.into()),
        payload: format!("{{\"id\":\"{id}\"}}"),
        state: billsync::store::EventState::Pending,
    }
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

/// An inbox written before the event queue existed keeps every event where it stood.
async fn upgrading_keeps_waiting_events_waiting(backend: Backend) {
    use billsync::store::EventState;
    let Some(t) = backend
        .unmigrated_store("upgrading_keeps_waiting_events_waiting")
        .await
    else {
        return;
    };
    // The schema as it was before the queue: every migration before `*_event_queue.sql`.
    let before = tempfile::tempdir().unwrap();
    let mut files: Vec<_> = std::fs::read_dir(backend.migrations_dir())
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

on_every_store!(
    an_emails_spelling_is_kept_with_it,
    subscription_watermarks_rise_with_a_deletion,
    deleted_customers_are_never_linked,
    customer_updates_are_read_and_written_in_batches,
    event_states_follow_the_queue,
    parked_events_are_pruned_after_the_retention,
    upgrading_keeps_waiting_events_waiting,
    the_event_inbox_orders_dedups_retries_and_prunes,
    profile_changes_queue_one_coalesced_push,
    jobs_retry_fail_and_are_requeued,
    expired_job_leases_are_reclaimed,
    a_stale_claim_cannot_finish_or_rewrite_its_job,
    concurrent_workers_claim_each_job_once,
    erasure_removes_the_user_and_keeps_no_personal_data,
    usage_subscriptions_and_pushes_round_trip,
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
