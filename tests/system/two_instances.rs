//! Two `billsync serve` processes on one Postgres, sharing the work: 2,000 webhook events and
//! 500 profile updates sent to either. Every event is stored once and applied, each customer
//! ends on its newest event, every profile reaches Stripe, and no customer ever has two pushes
//! in flight at once.

use crate::support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use serde_json::json;
use support::{
    eventually,
    process::{free_port, start_with, wait_ready},
    Backend,
};

const EVENT_USERS: usize = 50;
const EVENTS: usize = 2_000;
const EDIT_USERS: usize = 50;
const EDITS: usize = 500;

/// A fake Stripe that records each update and notices two for one customer at once.
#[derive(Clone, Default)]
struct Stripe {
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
    overlaps: Arc<Mutex<usize>>,
    last_name: Arc<Mutex<HashMap<String, String>>>,
    updates: Arc<Mutex<usize>>,
}

impl wiremock::Respond for Stripe {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let customer = request
            .url
            .path()
            .trim_start_matches("/v1/customers/")
            .to_owned();
        {
            let mut in_flight = self.in_flight.lock().unwrap();
            let n = in_flight.entry(customer.clone()).or_default();
            *n += 1;
            if *n > 1 {
                *self.overlaps.lock().unwrap() += 1;
            }
        }
        // Hold the request a moment, so an overlapping push would be seen.
        std::thread::sleep(Duration::from_millis(15));
        let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&request.body).unwrap();
        if let Some((_, name)) = form.iter().find(|(k, _)| k == "name") {
            self.last_name
                .lock()
                .unwrap()
                .insert(customer.clone(), name.clone());
        }
        *self.updates.lock().unwrap() += 1;
        *self.in_flight.lock().unwrap().get_mut(&customer).unwrap() -= 1;
        wiremock::ResponseTemplate::new(200)
            .set_body_json(json!({"id": customer, "object": "customer"}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_work_and_lose_nothing() {
    let Some(t) = Backend::Postgres
        .store("two_instances_share_the_work")
        .await
    else {
        return;
    };
    let fake = Stripe::default();
    let stripe = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(fake.clone())
        .mount(&stripe)
        .await;
    for (prefix, count) in [("ev", EVENT_USERS), ("ed", EDIT_USERS)] {
        for c in 0..count {
            let user = format!("{prefix}{c}");
            support::seed_linked_user(t.store.as_ref(), &user, &format!("cus_{user}")).await;
        }
    }
    let settings = [
        ("BILLSYNC_STRIPE_API_BASE", stripe.uri()),
        ("BILLSYNC_ADMIN_API_KEY", support::ADMIN_KEY.to_owned()),
        ("BILLSYNC_OUTBOX_DEBOUNCE_MS", "50".to_owned()),
        ("BILLSYNC_WEBHOOK_TOLERANCE_SECS", "86400".to_owned()),
    ];
    let ports = [free_port(), free_port()];
    let _servers: Vec<_> = ports
        .iter()
        .map(|p| start_with(&t.url, *p, &settings))
        .collect();
    for port in ports {
        wait_ready(port).await;
    }
    let http = reqwest::Client::new();

    // Events and edits interleaved, alternating between the instances, 16 at a time.
    enum Work {
        Event(usize),
        Edit(usize),
    }
    let work: Vec<Work> = (0..EVENTS.max(EDITS))
        .flat_map(|i| {
            let mut w = Vec::new();
            if i < EVENTS {
                w.push(Work::Event(i));
            }
            if i < EDITS {
                w.push(Work::Edit(i));
            }
            w
        })
        .collect();
    let statuses: Vec<u16> = futures_util::stream::iter(work.into_iter().enumerate())
        .map(|(n, item)| {
            let http = http.clone();
            let base = format!("http://127.0.0.1:{}", ports[n % 2]);
            async move {
                let request = match item {
                    Work::Event(i) => {
                        let c = i % EVENT_USERS;
                        let body = json!({
                            "id": format!("evt_two{i}"), "object": "event",
                            "type": "customer.updated", "created": 1_000_000 + i,
                            "livemode": false,
                            "data": {"object": {"id": format!("cus_ev{c}"), "object": "customer",
                                                "email": format!("ev{c}@example.com"),
                                                "name": format!("Event{i} Two"), "metadata": {}}}
                        })
                        .to_string();
                        http.post(format!("{base}/api/webhooks/stripe"))
                            .header(
                                "stripe-signature",
                                support::stripe_signature(support::WEBHOOK_SECRET, &body),
                            )
                            .body(body)
                    }
                    Work::Edit(k) => {
                        let c = k % EDIT_USERS;
                        http.put(format!("{base}/v1/users/ed{c}"))
                            .bearer_auth(support::ADMIN_KEY)
                            .json(&json!({"email": format!("ed{c}@example.com"),
                                          "email_verified": true,
                                          "first_name": format!("Edit{k}"), "last_name": "Two"}))
                    }
                };
                request.send().await.unwrap().status().as_u16()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request answered 200"
    );

    let store = t.store.clone();
    eventually(60, "every event applied", || async {
        let pending = store
            .list_events(Some(billsync::store::EventState::Pending), 10)
            .await
            .unwrap();
        pending.is_empty().then_some(())
    })
    .await;
    let applied = store
        .list_events(Some(billsync::store::EventState::Applied), 10_000)
        .await
        .unwrap();
    assert_eq!(applied.len(), EVENTS, "each event stored once and applied");
    assert!(store
        .list_events(Some(billsync::store::EventState::Failed), 10)
        .await
        .unwrap()
        .is_empty());
    for c in 0..EVENT_USERS {
        let newest = (0..EVENTS).filter(|i| i % EVENT_USERS == c).max().unwrap();
        let user = store
            .get_user(&billsync::domain::UserId::parse(&format!("ev{c}")).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            user.first_name.unwrap().as_str(),
            format!("Event{newest}"),
            "ev{c} ends on its newest event"
        );
    }
    eventually(60, "every profile reached Stripe", || async {
        let names = fake.last_name.lock().unwrap();
        let done = (0..EDIT_USERS).all(|c| {
            let newest = (0..EDITS).filter(|k| k % EDIT_USERS == c).max().unwrap();
            names.get(&format!("cus_ed{c}")) == Some(&format!("Edit{newest} Two"))
        });
        done.then_some(())
    })
    .await;
    let overlaps = *fake.overlaps.lock().unwrap();
    assert_eq!(
        overlaps, 0,
        "two pushes for one customer were in flight at once"
    );
    println!(
        "{EVENTS} events and {EDITS} edits over two instances: {} applied, {} pushes to reach \
         {EDIT_USERS} customers, 0 overlapping",
        applied.len(),
        *fake.updates.lock().unwrap()
    );
}

/// An instance started with `BILLSYNC_RUN_WORKERS=false` stores events and applies none;
/// a worker instance on the same database applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_only_instance_leaves_the_work_to_workers() {
    use billsync::store::EventState;
    let Some(t) = Backend::Postgres
        .store("an_http_only_instance_leaves_the_work")
        .await
    else {
        return;
    };
    support::seed_linked_user(t.store.as_ref(), "web", "cus_web").await;
    let settings = [("BILLSYNC_WEBHOOK_TOLERANCE_SECS", "86400".to_owned())];
    let web_port = free_port();
    let _web = start_with(
        &t.url,
        web_port,
        &[
            settings[0].clone(),
            ("BILLSYNC_RUN_WORKERS", "false".to_owned()),
        ],
    );
    wait_ready(web_port).await;
    let http = reqwest::Client::new();
    for i in 0..20 {
        let body = json!({
            "id": format!("evt_web{i}"), "object": "event", "type": "customer.updated",
            "created": 1_000 + i, "livemode": false,
            "data": {"object": {"id": "cus_web", "object": "customer",
                                "email": "web@example.com", "name": format!("Web{i} Only"),
                                "metadata": {}}}
        })
        .to_string();
        let response = http
            .post(format!("http://127.0.0.1:{web_port}/api/webhooks/stripe"))
            .header(
                "stripe-signature",
                support::stripe_signature(support::WEBHOOK_SECRET, &body),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // The applier polls every few hundred milliseconds: a second is several chances.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pending = t
        .store
        .list_events(Some(EventState::Pending), 100)
        .await
        .unwrap();
    assert_eq!(pending.len(), 20, "the HTTP-only instance applied nothing");

    let worker_port = free_port();
    let _worker = start_with(&t.url, worker_port, &settings);
    wait_ready(worker_port).await;
    eventually(15, "the worker instance applied every event", || async {
        let applied = t
            .store
            .list_events(Some(EventState::Applied), 100)
            .await
            .unwrap();
        (applied.len() == 20).then_some(())
    })
    .await;
    let user = t
        .store
        .get_user(&billsync::domain::UserId::parse("web").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.first_name.unwrap().as_str(), "Web19");
}
