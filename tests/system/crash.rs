//! Crash safety of webhook ingestion: the server is killed with SIGKILL in the middle of a
//! burst; after a restart every event that was acknowledged is stored and applied, and the
//! users end in the state of the newest event.

use crate::support;

use support::process::{free_port, start_with, wait_ready};

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use billsync::{
    domain::UserId,
    store::{EventState, Store},
};
use serde_json::json;
use support::Backend;

const CUSTOMERS: usize = 50;
const EVENTS: usize = 5_000;

fn event(i: usize) -> (String, String, usize) {
    let customer = i % CUSTOMERS;
    let id = format!("evt_crash{i}");
    let body = json!({
        "id": id, "object": "event", "type": "customer.updated", "created": 1_000_000 + i,
        "livemode": false,
        "data": {"object": {"id": format!("cus_crash{customer}"), "object": "customer",
                            "email": format!("crash{customer}@example.com"),
                            "name": format!("Event{i} Crash"), "metadata": {}}}
    })
    .to_string();
    (id, body, customer)
}

async fn a_kill_during_a_burst_loses_no_acknowledged_event(backend: Backend) {
    let test = "a_kill_during_a_burst_loses_no_acknowledged_event";
    let Some(t) = backend.store(test).await else {
        return;
    };
    for c in 0..CUSTOMERS {
        support::seed_linked_user(
            t.store.as_ref(),
            &format!("crash{c}"),
            &format!("cus_crash{c}"),
        )
        .await;
    }

    let port = free_port();
    let mut server = start_with(&t.url, port, &[]);
    wait_ready(port).await;

    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let senders: Vec<_> = (0..16)
        .map(|_| {
            let (acked, next) = (acked.clone(), next.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= EVENTS {
                        return;
                    }
                    let (id, body, _) = event(i);
                    let signature = support::stripe_signature(support::WEBHOOK_SECRET, &body);
                    let sent = http
                        .post(format!("http://127.0.0.1:{port}/api/webhooks/stripe"))
                        .header("stripe-signature", signature)
                        .body(body)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                    match sent {
                        Ok(response) if response.status().is_success() => {
                            acked.lock().unwrap().insert(id);
                        }
                        // After the kill: Stripe would retry; this test only counts what was acknowledged.
                        _ => {}
                    }
                }
            })
        })
        .collect();

    // Kill in the middle of the burst.
    while acked.lock().unwrap().len() < 1_500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill(); // SIGKILL
    for sender in senders {
        sender.await.unwrap();
    }
    let acknowledged = acked.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 1_500 && acknowledged.len() < EVENTS,
        "killed mid-burst: {}",
        acknowledged.len()
    );

    // Restart on the same database: everything acknowledged is there and gets applied.
    let mut server = start_with(&t.url, port, &[]);
    wait_ready(port).await;
    let store: &Arc<dyn Store> = &t.store;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending = store
            .list_events(Some(EventState::Pending), 10)
            .await
            .unwrap()
            .len()
            + store
                .list_events(Some(EventState::Failed), 10)
                .await
                .unwrap()
                .len();
        if pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events still pending after restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let applied: HashSet<String> = store
        .list_events(Some(EventState::Applied), 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let lost: Vec<&String> = acknowledged.difference(&applied).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    assert_eq!(
        store.list_events(None, 10_000).await.unwrap().len(),
        applied.len(),
        "each stored once"
    );

    // Each user holds the newest of its customer's stored events: nothing applied out of order.
    let mut newest: HashMap<usize, usize> = HashMap::new();
    for id in &applied {
        let i: usize = id.trim_start_matches("evt_crash").parse().unwrap();
        let c = i % CUSTOMERS;
        newest
            .entry(c)
            .and_modify(|n| *n = (*n).max(i))
            .or_insert(i);
    }
    for (c, i) in newest {
        let user = store
            .get_user(&UserId::parse(&format!("crash{c}")).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            user.first_name.unwrap().as_str(),
            format!("Event{i}"),
            "crash{c}"
        );
    }
    server.kill();
    println!(
        "acknowledged {} of {EVENTS} before the kill; all applied",
        acknowledged.len()
    );
}

/// The fake Stripe's record of applied customer updates: (customer, name), in arrival order.
#[derive(Clone, Default)]
struct Updates(Arc<Mutex<Vec<(String, String)>>>);

impl wiremock::Respond for Updates {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&request.body).unwrap();
        let name = form
            .iter()
            .find(|(k, _)| k == "name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let customer = request
            .url
            .path()
            .trim_start_matches("/v1/customers/")
            .to_owned();
        self.0.lock().unwrap().push((customer.clone(), name));
        wiremock::ResponseTemplate::new(200)
            .set_body_json(json!({"id": customer, "object": "customer"}))
            .set_delay(Duration::from_millis(50))
    }
}

const PUSHES: usize = 60;

async fn a_kill_during_outbox_work_loses_no_push(backend: Backend) {
    let test = "a_kill_during_outbox_work_loses_no_push";
    let Some(t) = backend.store(test).await else {
        return;
    };
    let stripe = wiremock::MockServer::start().await;
    let updates = Updates::default();
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(updates.clone())
        .mount(&stripe)
        .await;
    for c in 0..PUSHES {
        support::seed_linked_user(
            t.store.as_ref(),
            &format!("push{c}"),
            &format!("cus_push{c}"),
        )
        .await;
    }
    let settings = [
        ("BILLSYNC_STRIPE_API_BASE", stripe.uri()),
        ("BILLSYNC_STRIPE_TIMEOUT_MS", "500".to_owned()),
        ("BILLSYNC_OUTBOX_LEASE_SECS", "3".to_owned()),
        ("BILLSYNC_OUTBOX_DEBOUNCE_MS", "0".to_owned()),
        ("BILLSYNC_ADMIN_API_KEY", support::ADMIN_KEY.to_owned()),
    ];
    let port = free_port();
    let mut server = start_with(&t.url, port, &settings);
    wait_ready(port).await;
    let http = reqwest::Client::new();
    for c in 0..PUSHES {
        let response = http
            .put(format!("http://127.0.0.1:{port}/v1/users/push{c}"))
            .bearer_auth(support::ADMIN_KEY)
            .json(
                &json!({"email": format!("push{c}@example.com"), "email_verified": true,
                          "first_name": "Final", "last_name": format!("N{c}")}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // Kill it in the middle of the pushes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while updates.0.lock().unwrap().len() < PUSHES / 4 {
        assert!(Instant::now() < deadline, "pushes never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    let at_kill = updates.0.lock().unwrap().len();
    assert!(
        at_kill < PUSHES,
        "killed too late to test anything: {at_kill}"
    );

    let port = free_port();
    let mut server = start_with(&t.url, port, &settings);
    wait_ready(port).await;
    support::eventually(30, "every push landed after the restart", || async {
        let landed: HashSet<String> = updates
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(c, _)| c.clone())
            .collect();
        (landed.len() == PUSHES).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill();

    let log = updates.0.lock().unwrap().clone();
    let mut last: HashMap<String, String> = HashMap::new();
    let mut count: HashMap<String, usize> = HashMap::new();
    for (customer, name) in &log {
        last.insert(customer.clone(), name.clone());
        *count.entry(customer.clone()).or_default() += 1;
    }
    for c in 0..PUSHES {
        let customer = format!("cus_push{c}");
        assert_eq!(
            last[&customer],
            format!("Final N{c}"),
            "{customer} ends as the user is"
        );
        // A push in flight at the kill may run again (same values): never more.
        assert!(
            count[&customer] <= 2,
            "{customer} pushed {} times",
            count[&customer]
        );
    }
    let repeated = count.values().filter(|n| **n > 1).count();
    println!(
        "{PUSHES} pushes queued; {at_kill} landed before the kill; {} landed in all, {repeated} \
         repeated (same values)",
        last.len()
    );
}

on_every_store!(
    a_kill_during_a_burst_loses_no_acknowledged_event,
    a_kill_during_outbox_work_loses_no_push
);
