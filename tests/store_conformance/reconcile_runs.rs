//! Reconciliation runs: one live at a time, a lease that makes a stopped run read as
//! interrupted and frees its place, reports kept for any instance, and only the newest kept.

use serde_json::json;

use super::*;

const LEASE: Duration = Duration::from_secs(30);

async fn status_of(store: &dyn Store, id: &str) -> String {
    store.reconcile_run(id).await.unwrap().unwrap().status
}

async fn one_run_is_live_at_a_time_and_its_report_is_kept(backend: Backend) {
    let Some(t) = backend.store("one_reconcile_run_is_live_at_a_time").await else {
        return;
    };
    let store = &t.store;
    assert!(store
        .start_reconcile_run("rec_a", true, LEASE, 20)
        .await
        .unwrap());
    assert!(
        !store
            .start_reconcile_run("rec_b", false, LEASE, 20)
            .await
            .unwrap(),
        "another run is live"
    );
    assert_eq!(store.reconcile_run("rec_b").await.unwrap(), None);
    let running = store.reconcile_run("rec_a").await.unwrap().unwrap();
    assert_eq!((running.status.as_str(), running.apply), ("running", true));
    assert_eq!(running.progress, json!({}));
    assert!(store
        .renew_reconcile_run("rec_a", &json!({"stripe_pages": 3}), LEASE)
        .await
        .unwrap());
    assert_eq!(
        store
            .reconcile_run("rec_a")
            .await
            .unwrap()
            .unwrap()
            .progress,
        json!({"stripe_pages": 3})
    );

    let report = json!({"summary": {"ok": {"found": 7, "fixed": 0}}});
    assert!(store
        .finish_reconcile_run("rec_a", &json!({"phase": "done"}), Ok(&report))
        .await
        .unwrap());
    let done = store.reconcile_run("rec_a").await.unwrap().unwrap();
    assert_eq!(done.status, "done");
    assert_eq!(done.report, Some(report.clone()));
    assert_eq!(done.progress, json!({"phase": "done"}));
    assert!(done.finished_at.is_some());
    // Finished: it cannot be renewed or finished again, and the next run may start.
    assert!(!store
        .renew_reconcile_run("rec_a", &json!({}), LEASE)
        .await
        .unwrap());
    assert!(!store
        .finish_reconcile_run("rec_a", &json!({}), Err("late"))
        .await
        .unwrap());
    assert!(store
        .start_reconcile_run("rec_b", false, LEASE, 20)
        .await
        .unwrap());
    assert!(store
        .finish_reconcile_run("rec_b", &json!({}), Err("Stripe refused a request"))
        .await
        .unwrap());
    let failed = store.reconcile_run("rec_b").await.unwrap().unwrap();
    assert_eq!(
        (
            failed.status.as_str(),
            failed.error.as_deref(),
            failed.report
        ),
        ("failed", Some("Stripe refused a request"), None)
    );
}

async fn a_run_whose_lease_ran_out_reads_interrupted_and_frees_its_place(backend: Backend) {
    let Some(t) = backend.store("a_reconcile_run_whose_lease_ran_out").await else {
        return;
    };
    let store = &t.store;
    let short = Duration::from_millis(200);
    assert!(store
        .start_reconcile_run("rec_dead", false, short, 20)
        .await
        .unwrap());
    assert_eq!(status_of(store.as_ref(), "rec_dead").await, "running");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let dead = store.reconcile_run("rec_dead").await.unwrap().unwrap();
    assert_eq!(dead.status, "interrupted");
    assert!(dead.error.is_some());
    assert!(store
        .start_reconcile_run("rec_next", false, LEASE, 20)
        .await
        .unwrap());
    // Marked for good: its process cannot bring it back.
    assert!(!store
        .renew_reconcile_run("rec_dead", &json!({}), LEASE)
        .await
        .unwrap());
    assert_eq!(status_of(store.as_ref(), "rec_dead").await, "interrupted");
}

async fn only_the_newest_finished_runs_are_kept(backend: Backend) {
    let Some(t) = backend
        .store("only_the_newest_reconcile_runs_are_kept")
        .await
    else {
        return;
    };
    let store = &t.store;
    for n in 0..5 {
        let id = format!("rec_{n}");
        assert!(store
            .start_reconcile_run(&id, false, LEASE, 3)
            .await
            .unwrap());
        store
            .finish_reconcile_run(&id, &json!({}), Ok(&json!({})))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut kept = Vec::new();
    for n in 0..5 {
        if store
            .reconcile_run(&format!("rec_{n}"))
            .await
            .unwrap()
            .is_some()
        {
            kept.push(n);
        }
    }
    assert_eq!(kept, [2, 3, 4]);
}

async fn a_run_notes_the_linked_customers_it_met_and_finds_the_others(backend: Backend) {
    let Some(t) = backend
        .store("a_run_notes_the_linked_customers_it_met")
        .await
    else {
        return;
    };
    let store = &t.store;
    for n in 0..4 {
        let user = format!("u{n}");
        store
            .upsert_user(&upsert(&user, &format!("{user}@example.com")))
            .await
            .unwrap();
        if n < 3 {
            store
                .insert_link(
                    &UserId::parse(&user).unwrap(),
                    &cus(&format!("cus_{n}")),
                    false,
                    LinkSource::Created,
                )
                .await
                .unwrap();
        }
    }
    assert_eq!(store.user_and_link_counts().await.unwrap(), (4, 3));
    let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let mut found = store
        .users_by_ids(&ids(&["u1", "u3", "nobody"]))
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.id.to_string())
        .collect::<Vec<_>>();
    found.sort();
    assert_eq!(found, ["u1", "u3"]);
    // By customer or by user, in one lookup.
    let mut links = store
        .links_of(&ids(&["cus_0", "cus_unknown"]), &ids(&["u2", "u3"]))
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.user_id.to_string(), l.customer_id.to_string()))
        .collect::<Vec<_>>();
    links.sort();
    assert_eq!(
        links,
        [("u0".into(), "cus_0".into()), ("u2".into(), "cus_2".into())]
    );
    assert!(store.links_of(&[], &[]).await.unwrap().is_empty());

    // A page met cus_0 (and a customer nobody links); another run met cus_2.
    store
        .mark_linked_seen("rec_x", &ids(&["cus_0", "cus_unlinked"]))
        .await
        .unwrap();
    store
        .mark_linked_seen("rec_x", &ids(&["cus_0"]))
        .await
        .unwrap();
    store
        .mark_linked_seen("rec_y", &ids(&["cus_2"]))
        .await
        .unwrap();
    let unmet = |after: Option<&'static str>, limit| {
        let store = store.clone();
        async move {
            let after = after.map(|a| UserId::parse(a).unwrap());
            store
                .links_not_seen("rec_x", after.as_ref(), limit)
                .await
                .unwrap()
                .into_iter()
                .map(|l| l.user_id.to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(unmet(None, 10).await, ["u1", "u2"]);
    assert_eq!(unmet(None, 1).await, ["u1"]);
    assert_eq!(unmet(Some("u1"), 10).await, ["u2"]);
    store.forget_seen("rec_x").await.unwrap();
    assert_eq!(unmet(None, 10).await, ["u0", "u1", "u2"]);
    assert_eq!(
        store.links_not_seen("rec_y", None, 10).await.unwrap().len(),
        2,
        "another run's notes are its own"
    );
}

on_every_store!(
    a_run_notes_the_linked_customers_it_met_and_finds_the_others,
    one_run_is_live_at_a_time_and_its_report_is_kept,
    a_run_whose_lease_ran_out_reads_interrupted_and_frees_its_place,
    only_the_newest_finished_runs_are_kept,
);
