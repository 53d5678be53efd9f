//! Fenced outbox claims (issue 12 §8, §10): an operator's retry of a parked push sends a new
//! idempotency key; on Postgres two claimers never hold two jobs of one user, and a crashed
//! holder's job is taken over at once.

use crate::support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use billsync::{
    domain::UserId,
    store::{prelude::*, JobKind, JobState},
};
use reqwest::Method;
use serde_json::json;
use support::{eventually, Backend, TestApp};
use wiremock::{matchers::method, Mock, MockServer, Request, Respond, ResponseTemplate};

/// Stripe's customer update with its idempotency rule: a key seen before with another body
/// answers `400 idempotency_error`, with the same body the first answer again. The first
/// update ever is refused (a permanent error), so the push parks as failed.
/// An idempotency key and the request body it came with.
type Sent = (String, Vec<u8>);
/// The body first sent with a key, and the answer given.
type Answered = (Vec<u8>, ResponseTemplate);

#[derive(Clone, Default)]
struct IdempotentStripe {
    /// (key, body) of every request, in order.
    requests: Arc<Mutex<Vec<Sent>>>,
    /// Key → the body first sent with it, and the answer given.
    answered: Arc<Mutex<HashMap<String, Answered>>>,
}

impl Respond for IdempotentStripe {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let key = request
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let first = {
            let mut requests = self.requests.lock().unwrap();
            requests.push((key.clone(), request.body.clone()));
            requests.len() == 1
        };
        let mut answered = self.answered.lock().unwrap();
        if let Some((body, answer)) = answered.get(&key) {
            if *body != request.body {
                return ResponseTemplate::new(400).set_body_json(json!({"error": {
                    "type": "idempotency_error",
                    "message": "Keys for idempotent requests can only be used with the same \
                                parameters they were first used with."}}));
            }
            return answer.clone();
        }
        let answer = if first {
            ResponseTemplate::new(400).set_body_json(json!({"error": {
                "type": "invalid_request_error", "message": "induced refusal"}}))
        } else {
            let id = request.url.path().trim_start_matches("/v1/customers/");
            ResponseTemplate::new(200).set_body_json(json!({
                "id": id, "object": "customer", "email": "retry@example.com", "metadata": {}}))
        };
        answered.insert(key, (request.body.clone(), answer.clone()));
        answer
    }
}

async fn an_operator_retry_sends_a_new_idempotency_key(backend: Backend) {
    let Some(store) = backend
        .store("an_operator_retry_sends_a_new_idempotency_key")
        .await
    else {
        return;
    };
    let stripe = MockServer::start().await;
    let fake = IdempotentStripe::default();
    Mock::given(method("POST"))
        .respond_with(fake.clone())
        .mount(&stripe)
        .await;
    let app = TestApp::spawn(store.store.clone(), &support::test_config(&stripe.uri())).await;
    support::seed_linked_user(app.state.store.as_ref(), "retry", "cus_retry").await;
    app.put_user(
        "retry",
        json!({"email": "retry@example.com", "first_name": "Ada"}),
    )
    .await;

    let parked = eventually(10, "the push parks as failed", || async {
        app.state
            .store
            .list_jobs(Some(JobState::Failed), 10)
            .await
            .unwrap()
            .into_iter()
            .find(|j| j.kind == JobKind::PushProfile)
    })
    .await;
    // The body changes with every attempt (its sync timestamp); make sure it does here.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let response = app
        .admin(Method::POST, &format!("/v1/outbox/{}/retry", parked.id))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let done = eventually(10, "the retried push is done", || async {
        let job = app.state.store.get_job(parked.id).await.unwrap().unwrap();
        (job.state != JobState::Pending && job.state != JobState::InFlight).then_some(job)
    })
    .await;
    let requests = fake.requests.lock().unwrap().clone();
    assert_eq!(
        done.state,
        JobState::Done,
        "the retry succeeds: {:?}",
        done.last_error
    );
    assert_eq!(requests.len(), 2, "one refused push, one retried push");
    assert_ne!(requests[0].0, requests[1].0, "a new key for the retry");
    assert!(requests.iter().all(|(key, _)| !key.is_empty()));
}

on_every_store!(an_operator_retry_sends_a_new_idempotency_key);

fn upsert(id: &str, email: &str) -> billsync::store::UserUpsert {
    billsync::store::UserUpsert {
        id: UserId::parse(id).unwrap(),
        email: billsync::domain::Email::parse(email).unwrap(),
        email_verified: false,
        first_name: None,
        last_name: None,
        phone: None,
    }
}

/// Users with two due jobs each (a profile push and an erasure), claimed by two instances at
/// once, round after round: never two jobs of one user in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_claimers_never_hold_two_jobs_of_a_user() {
    let Some(t) = support::Backend::Postgres
        .store("postgres_concurrent_claimers_never_hold_two_jobs")
        .await
    else {
        return;
    };
    let options = billsync::store::StoreOptions::new(8);
    let other: Arc<dyn Store> = Arc::new(
        billsync::store::PgStore::connect(&t.url, &options)
            .await
            .unwrap(),
    );
    let pool = sqlx::PgPool::connect(&t.url).await.unwrap();
    for round in 0..15 {
        for i in 0..12 {
            let id = format!("u{round}-{i}");
            t.store
                .upsert_user(&upsert(&id, "a@example.com"))
                .await
                .unwrap();
            t.store
                .upsert_user(&upsert(&id, "b@example.com"))
                .await
                .unwrap();
            t.store
                .enqueue_erase(&UserId::parse(&id).unwrap(), &json!({}))
                .await
                .unwrap();
        }
        // Everything due now.
        sqlx::query("UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'")
            .execute(&pool)
            .await
            .unwrap();
        let claimers: Vec<_> = (0..4)
            .map(|n| {
                let store = if n % 2 == 0 {
                    t.store.clone()
                } else {
                    other.clone()
                };
                tokio::spawn(async move {
                    let jobs = store.claim_jobs(50, Duration::from_secs(30)).await.unwrap();
                    (store, jobs)
                })
            })
            .collect();
        // Each job with the store that claimed it: only that one can let go of its lock.
        let mut claimed = Vec::new();
        for claimer in claimers {
            let (store, jobs) = claimer.await.unwrap();
            claimed.extend(jobs.into_iter().map(|job| (store.clone(), job)));
        }
        let mut per_user: HashMap<String, usize> = HashMap::new();
        for (_, job) in &claimed {
            *per_user.entry(job.user_id.clone()).or_default() += 1;
        }
        assert!(
            per_user.values().all(|n| *n == 1),
            "round {round}: two jobs of one user claimed: {per_user:?}"
        );
        let doubled: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT user_id FROM outbox WHERE state = 'in_flight'
                                   GROUP BY user_id HAVING count(*) > 1) d",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(doubled, 0, "round {round}");
        assert_eq!(per_user.len(), 12, "round {round}: every user got one job");
        // Finish this round's jobs, each by its claimer: the next round starts clean. (Finished
        // by the other store, a job kept its claimer's lock connection, and after a few rounds
        // that store's job-lock pool had none left: PoolTimedOut, now and then.)
        for (store, job) in &claimed {
            store
                .finish_job(job, &billsync::store::JobOutcome::Done)
                .await
                .unwrap();
        }
        sqlx::query("UPDATE outbox SET state = 'done' WHERE state <> 'done'")
            .execute(&pool)
            .await
            .unwrap();
    }
}

/// A holder whose database session dies (a crash, a kill -9) frees its job at once: another
/// instance claims it without waiting for the 30 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_killed_holders_job_is_reclaimed_at_once() {
    let Some(t) = support::Backend::Postgres
        .store("postgres_a_killed_holders_job_is_reclaimed")
        .await
    else {
        return;
    };
    let options = billsync::store::StoreOptions::new(4);
    let holder = billsync::store::PgStore::connect(&t.url, &options)
        .await
        .unwrap();
    t.store
        .upsert_user(&upsert("killed", "a@example.com"))
        .await
        .unwrap();
    t.store
        .upsert_user(&upsert("killed", "b@example.com"))
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&t.url).await.unwrap();
    sqlx::query("UPDATE outbox SET next_attempt_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    let held = holder
        .claim_jobs(1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    // Alive: nobody else gets it.
    assert!(t
        .store
        .claim_jobs(1, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    // The holder's sessions die.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
         WHERE locktype = 'advisory' AND classid::bigint = 1868724273 AND granted",
    )
    .execute(&pool)
    .await
    .unwrap();
    let taken = eventually(3, "the job is claimed again", || async {
        t.store
            .claim_jobs(1, Duration::from_secs(30))
            .await
            .unwrap()
            .pop()
    })
    .await;
    assert_eq!(taken.id, held.id);
    assert_ne!(taken.claim_token, held.claim_token);
    // The dead holder's late result is refused.
    assert!(!holder
        .finish_job(&held, &billsync::store::JobOutcome::Done)
        .await
        .unwrap());
    assert!(t
        .store
        .finish_job(&taken, &billsync::store::JobOutcome::Done)
        .await
        .unwrap());
}
