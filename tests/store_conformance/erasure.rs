//! Erasure: what is left of a person afterwards.

use super::*;

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

on_every_store!(erasure_removes_the_user_and_keeps_no_personal_data,);
