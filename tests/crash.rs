//! Crash safety of webhook ingestion: the server is killed with SIGKILL in the middle of a
//! burst; after a restart every event that was acknowledged is stored and applied, and the
//! users end in the state of the newest event.

mod support;

use std::{
    collections::{HashMap, HashSet},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use billsync::{
    domain::{LinkSource, StripeCustomerId, UserId},
    store::{EventState, Store},
};
use serde_json::json;
use support::Backend;

const CUSTOMERS: usize = 50;
const EVENTS: usize = 5_000;

fn log_path(port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("billsync-crash-{port}.log"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server process; killed when dropped, so a failing test leaves nothing running.
struct Server(Child);

impl Server {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn start(database_url: &str, port: u16) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_billsync"));
    for (key, _) in std::env::vars() {
        if key.starts_with("BILLSYNC_") || key.starts_with("STRIPE_") || key == "DATABASE_URL" {
            command.env_remove(key);
        }
    }
    command
        .env("DATABASE_URL", database_url)
        .env("STRIPE_SECRET_KEY", support::STRIPE_KEY)
        .env("STRIPE_WEBHOOK_SECRET", support::WEBHOOK_SECRET)
        .env("BILLSYNC_STRIPE_API_BASE", "http://127.0.0.1:9")
        .env("BILLSYNC_LISTEN", format!("127.0.0.1:{port}"))
        .env("BILLSYNC_OUTBOX_POLL_MS", "20")
        .env("RUST_LOG", "warn")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_path(port)).expect("log file"))
        .spawn()
        .map(Server)
        .expect("start billsync")
}

async fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "billsync did not become ready: {}",
            std::fs::read_to_string(log_path(port)).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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
        let user = UserId::parse(&format!("crash{c}")).unwrap();
        t.store
            .upsert_user(&billsync::store::UserUpsert {
                id: user.clone(),
                email: billsync::domain::Email::parse(&format!("crash{c}@example.com")).unwrap(),
                email_verified: true,
                first_name: None,
                last_name: None,
                phone: None,
            })
            .await
            .unwrap();
        t.store
            .insert_link(
                &user,
                &StripeCustomerId::parse(&format!("cus_crash{c}")).unwrap(),
                false,
                LinkSource::Created,
            )
            .await
            .unwrap();
    }

    let port = free_port();
    let mut server = start(&t.url, port);
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
    let mut server = start(&t.url, port);
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

on_every_store!(a_kill_during_a_burst_loses_no_acknowledged_event);
