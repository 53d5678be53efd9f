//! Postgres restarted in the middle of a webhook burst: billsync answers 503 while it is down
//! (never a 2xx for an event it could not store), `readyz` says so, it recovers without a
//! restart of its own, and every acknowledged event is stored and applied.
//!
//! It restarts the machine's Postgres cluster, so it runs only with
//! `BILLSYNC_TEST_PG_RESTART=1` (`.ci/run` sets it); in `tests/alone`, one test at a time, so
//! no other test runs meanwhile.

use crate::support;

use std::{
    collections::HashSet,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::json;
use support::{
    eventually,
    process::{free_port, start_with, wait_ready},
};

const CUSTOMERS: usize = 20;

/// Stops the cluster, keeps it down for `down` (longer than billsync's 3 s wait for a
/// connection, so requests do fail), and starts it again.
fn restart_postgres(down: Duration) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian Postgres cluster")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .expect("a cluster version");
    let ctl = |args: &[&str]| {
        let status = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &version, "main"])
            .args(args)
            .status()
            .expect("pg_ctlcluster");
        assert!(status.success(), "pg_ctlcluster {args:?}");
    };
    ctl(&["stop", "-m", "fast"]);
    std::thread::sleep(down);
    ctl(&["start"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_burst_loses_no_acknowledged_event() {
    let _alone = crate::one_at_a_time().await;
    let test = "a_postgres_restart_mid_burst_loses_no_acknowledged_event";
    if std::env::var("BILLSYNC_TEST_PG_RESTART").as_deref() != Ok("1") {
        support::skip(
            test,
            "BILLSYNC_TEST_PG_RESTART=1 is not set (it restarts Postgres)",
        );
        return;
    }
    let Some(t) = support::postgres_store_with(test, &billsync::store::StoreOptions::new(20)).await
    else {
        return;
    };
    for c in 0..CUSTOMERS {
        support::seed_linked_user(t.store.as_ref(), &format!("pgr{c}"), &format!("cus_pgr{c}"))
            .await;
    }
    let port = free_port();
    let _server = start_with(
        &t.url,
        port,
        &[("BILLSYNC_WEBHOOK_TOLERANCE_SECS", "86400".to_owned())],
    );
    wait_ready(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // A steady stream of deliveries until told to stop; each 2xx is remembered.
    let acknowledged: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let refused: Arc<Mutex<Vec<u16>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (http, base) = (http.clone(), base.clone());
        let (acknowledged, refused, stop) = (acknowledged.clone(), refused.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let c = i % CUSTOMERS;
                let body = json!({
                    "id": format!("evt_pgr{i}"), "object": "event", "type": "customer.updated",
                    "created": 1_000_000 + i, "livemode": false,
                    "data": {"object": {"id": format!("cus_pgr{c}"), "object": "customer",
                                        "email": format!("pgr{c}@example.com"),
                                        "name": format!("Event{i} Restart"), "metadata": {}}}
                })
                .to_string();
                let answer = http
                    .post(format!("{base}/api/webhooks/stripe"))
                    .header(
                        "stripe-signature",
                        support::stripe_signature(support::WEBHOOK_SECRET, &body),
                    )
                    .body(body)
                    .send()
                    .await;
                match answer.map(|r| r.status().as_u16()) {
                    Ok(200) => {
                        acknowledged.lock().unwrap().insert(i);
                    }
                    Ok(status) => refused.lock().unwrap().push(status),
                    Err(_) => refused.lock().unwrap().push(0),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    eventually(20, "a first batch acknowledged", || async {
        (acknowledged.lock().unwrap().len() >= 100).then_some(())
    })
    .await;
    let before = acknowledged.lock().unwrap().len();

    // Restart Postgres; watch readyz while it is down.
    let watcher = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut saw_down = false;
            while started.elapsed() < Duration::from_secs(30) {
                if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
                    if r.status() == 503 {
                        saw_down = true;
                    } else if saw_down && r.status() == 200 {
                        return (true, true);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (saw_down, false)
        })
    };
    tokio::task::spawn_blocking(|| restart_postgres(Duration::from_secs(6)))
        .await
        .unwrap();
    let (saw_down, came_back) = watcher.await.unwrap();
    assert!(saw_down, "readyz answered 503 while Postgres was down");
    assert!(
        came_back,
        "readyz answered 200 again without restarting billsync"
    );
    // Keep delivering after the restart, then stop.
    let after_restart = acknowledged.lock().unwrap().len();
    eventually(30, "deliveries acknowledged again", || async {
        (acknowledged.lock().unwrap().len() >= after_restart + 100).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.await.unwrap();

    let acknowledged = acknowledged.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    assert!(
        refused.iter().all(|s| *s == 503 || *s == 0),
        "while down: 503 (or no answer), never another status: {refused:?}"
    );
    assert!(!refused.is_empty(), "some deliveries fell in the outage");
    // Every acknowledged event is stored and applied.
    let store = t.store.clone();
    let stored: HashSet<String> = eventually(60, "every acknowledged event applied", || {
        let store = store.clone();
        let acknowledged = acknowledged.clone();
        async move {
            let applied: HashSet<String> = store
                .list_events(Some(billsync::store::EventState::Applied), 100_000)
                .await
                .ok()?
                .into_iter()
                .map(|e| e.id)
                .collect();
            acknowledged
                .iter()
                .all(|i| applied.contains(&format!("evt_pgr{i}")))
                .then_some(applied)
        }
    })
    .await;
    println!(
        "acknowledged {} ({before} before the restart), refused {} during it ({} with 503); \
         all {} acknowledged stored and applied",
        acknowledged.len(),
        refused.len(),
        refused.iter().filter(|s| **s == 503).count(),
        acknowledged
            .iter()
            .filter(|i| stored.contains(&format!("evt_pgr{i}")))
            .count()
    );
}
