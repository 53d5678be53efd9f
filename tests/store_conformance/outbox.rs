//! Outbox jobs: claims, fencing, retries, leases.

use super::*;

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
                    // Finished as a worker finishes them: on Postgres a batch holds one of a
                    // few lock connections until its jobs end, so claimers that never finish
                    // would run out of connections when the claims race into small batches.
                    for job in batch {
                        assert!(store.finish_job(&job, &JobOutcome::Done).await.unwrap());
                        mine.push(job.id);
                    }
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

on_every_store!(
    jobs_retry_fail_and_are_requeued,
    expired_job_leases_are_reclaimed,
    a_stale_claim_cannot_finish_or_rewrite_its_job,
    concurrent_workers_claim_each_job_once,
);
