//! Stripe misbehaving for a window of seconds — 500s, then 429s with Retry-After, then answers
//! that never come (past the client's timeout) — during a workload of resolves and profile
//! pushes. Afterwards: one customer per user, every push applied exactly once (idempotency
//! keys hold across the retries of a lost answer), and the user routes answered throughout.

use crate::support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use reqwest::Method;
use serde_json::{json, Value};
use support::{eventually, Backend, TestApp};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const USERS: usize = 8;
const FAIL_500: Duration = Duration::from_secs(2);
const FAIL_429: Duration = Duration::from_secs(4);
const HANG: Duration = Duration::from_secs(6);

#[derive(Default)]
struct Ledger {
    customers: Vec<Value>,
    /// Idempotency key → the answer first given for it (Stripe's replay rule).
    answered: HashMap<String, Value>,
    /// Updates applied per customer (replays excluded).
    updates: HashMap<String, usize>,
    faults: usize,
}

/// A stateful fake Stripe (list by email, create, update, with idempotency keys) that fails
/// by phase of a clock started with it.
#[derive(Clone)]
struct FlakyStripe {
    started: Instant,
    ledger: Arc<Mutex<Ledger>>,
}

impl FlakyStripe {
    fn handle(&self, request: &Request) -> Value {
        let mut ledger = self.ledger.lock().unwrap();
        let key = request
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(answer) = key.as_ref().and_then(|k| ledger.answered.get(k)) {
            return answer.clone();
        }
        let form: Vec<(String, String)> =
            serde_urlencoded::from_bytes(&request.body).unwrap_or_default();
        let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let path = request.url.path().to_owned();
        let answer = match (request.method.as_str(), path.as_str()) {
            ("GET", "/v1/customers") => {
                let email = request
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == "email")
                    .map(|(_, v)| v.into_owned());
                let data: Vec<Value> = ledger
                    .customers
                    .iter()
                    .filter(|c| email.is_none() || c["email"].as_str() == email.as_deref())
                    .cloned()
                    .collect();
                json!({"object": "list", "data": data, "has_more": false})
            }
            ("GET", "/v1/customers/search") => {
                // As Stripe's search: `metadata["userId"]:"…"` or `email:"…"` (any case).
                let query = request
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == "query")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let quoted = |prefix: &str| {
                    query
                        .strip_prefix(prefix)
                        .map(|rest| rest.trim_matches('"').to_owned())
                };
                let data: Vec<Value> = ledger
                    .customers
                    .iter()
                    .filter(
                        |c| match (quoted("metadata[\"userId\"]:"), quoted("email:")) {
                            (Some(user), _) => {
                                c["metadata"]["userId"].as_str() == Some(user.as_str())
                            }
                            (_, Some(email)) => c["email"]
                                .as_str()
                                .is_some_and(|e| e.eq_ignore_ascii_case(&email)),
                            _ => false,
                        },
                    )
                    .cloned()
                    .collect();
                json!({"object": "search_result", "data": data, "has_more": false,
                       "next_page": null})
            }
            ("POST", "/v1/customers") => {
                let customer = json!({
                    "id": format!("cus_flaky{}", ledger.customers.len()),
                    "object": "customer",
                    "email": field("email"),
                    "name": field("name"),
                    "metadata": {"userId": field("metadata[userId]")},
                });
                ledger.customers.push(customer.clone());
                customer
            }
            ("POST", update) => {
                let id = update.trim_start_matches("/v1/customers/").to_owned();
                *ledger.updates.entry(id.clone()).or_default() += 1;
                let customer = ledger
                    .customers
                    .iter_mut()
                    .find(|c| c["id"] == id.as_str())
                    .expect("a known customer");
                for name in ["email", "name", "phone"] {
                    if let Some(value) = field(name) {
                        customer[name] = json!(value);
                    }
                }
                customer.clone()
            }
            other => panic!("unexpected Stripe call {other:?}"),
        };
        if let Some(key) = key {
            ledger.answered.insert(key, answer.clone());
        }
        answer
    }
}

impl Respond for FlakyStripe {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let elapsed = self.started.elapsed();
        let error = |status: u16, kind: &str| {
            ResponseTemplate::new(status)
                .set_body_json(json!({"error": {"type": kind, "message": "induced fault"}}))
        };
        if elapsed < FAIL_500 {
            self.ledger.lock().unwrap().faults += 1;
            return error(500, "api_error");
        }
        if elapsed < FAIL_429 {
            self.ledger.lock().unwrap().faults += 1;
            return error(429, "rate_limit_error").insert_header("Retry-After", "1");
        }
        // From here Stripe does the work; in the hang window its answer comes too late.
        let answer = self.handle(request);
        let template = ResponseTemplate::new(200).set_body_json(answer);
        if elapsed < HANG {
            self.ledger.lock().unwrap().faults += 1;
            return template.set_delay(Duration::from_secs(3));
        }
        template
    }
}

async fn stripe_faults_lose_nothing_and_duplicate_nothing(backend: Backend) {
    let Some(store) = backend.store("stripe_faults_lose_nothing").await else {
        return;
    };
    let stripe = MockServer::start().await;
    let flaky = FlakyStripe {
        started: Instant::now(),
        ledger: Arc::default(),
    };
    Mock::given(wiremock::matchers::any())
        .respond_with(flaky.clone())
        .mount(&stripe)
        .await;
    let mut config = support::test_config(&stripe.uri());
    config.outbox.max_attempts = 1_000; // the window outlasts the usual ten attempts
    let app = TestApp::spawn(store.store.clone(), &config).await;
    // Resolved during the window…
    let resolving: Vec<String> = (0..USERS).map(|i| format!("flaky-r{i}")).collect();
    // …and already linked, editing their profiles as it opens.
    let editing: Vec<String> = (0..USERS).map(|i| format!("flaky-p{i}")).collect();
    for user in resolving.iter().chain(&editing) {
        app.put_user(
            user,
            json!({"email": format!("{user}@example.com"), "email_verified": true}),
        )
        .await;
    }
    for (i, user) in editing.iter().enumerate() {
        let id = format!("cus_pre{i}");
        flaky.ledger.lock().unwrap().customers.push(json!({
            "id": id, "object": "customer", "email": format!("{user}@example.com"),
            "metadata": {"userId": user}}));
        support::link_in_store(app.state.store.as_ref(), user, &id).await;
    }
    for user in &editing {
        let token = support::user_token(
            user,
            Some(&format!("{user}@example.com")),
            Some(json!(true)),
        );
        let response = app
            .as_user(Method::PUT, "/api/user/profile", &token)
            .json(&json!({"firstName": "Edited", "lastName": user}))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .expect("writes are accepted at once, Stripe or not");
        assert_eq!(response.status(), 200);
    }

    // During the window: resolves fail cleanly (503, nothing linked), reads are served.
    let mut unavailable = 0;
    let mut resolved: HashMap<String, String> = HashMap::new();
    while flaky.started.elapsed() < HANG + Duration::from_secs(1) && resolved.len() < USERS {
        for user in &resolving {
            if !resolved.contains_key(user) {
                let (status, body) = app.resolve(user).await;
                match status {
                    200 => {
                        resolved.insert(user.clone(), body["customer_id"].as_str().unwrap().into());
                    }
                    503 => unavailable += 1,
                    other => panic!("resolve answered {other}: {body}"),
                }
            }
        }
        for user in &editing {
            let read = app
                .admin(Method::GET, &format!("/v1/users/{user}"))
                .timeout(Duration::from_millis(500))
                .send()
                .await
                .expect("reads are served during the outage");
            assert_eq!(read.status(), 200);
        }
    }
    assert!(
        flaky.started.elapsed() >= FAIL_429,
        "the workload ran through the window"
    );
    for user in &resolving {
        if !resolved.contains_key(user) {
            let (status, body) = app.resolve(user).await;
            assert_eq!(status, 200, "{body}");
            resolved.insert(user.clone(), body["customer_id"].as_str().unwrap().into());
        }
    }
    eventually(60, "every push landed", || async {
        let ledger = flaky.ledger.lock().unwrap();
        (ledger.updates.len() == USERS).then_some(())
    })
    .await;
    // Let any retry still in flight arrive before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let ledger = flaky.ledger.lock().unwrap();
    assert!(
        ledger.faults >= 10,
        "the window was felt: {} faults",
        ledger.faults
    );
    assert!(unavailable > 0, "resolves failed cleanly during the window");
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for customer in &ledger.customers {
        *per_user
            .entry(customer["metadata"]["userId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_user.len(), 2 * USERS);
    assert!(
        per_user.values().all(|n| *n == 1),
        "one customer per user: {per_user:?}"
    );
    assert_eq!(resolved.len(), USERS);
    println!(
        "{} faults injected; {unavailable} resolves answered 503 during the window; {} customers \
         for {} users; {} pushes queued, {} applied",
        ledger.faults,
        ledger.customers.len(),
        per_user.len(),
        editing.len(),
        ledger.updates.values().sum::<usize>(),
    );
    for (i, user) in editing.iter().enumerate() {
        let id = format!("cus_pre{i}");
        assert_eq!(
            ledger.updates.get(&id),
            Some(&1),
            "{user}'s push applied once"
        );
        let stored = ledger
            .customers
            .iter()
            .find(|c| c["id"] == id.as_str())
            .unwrap();
        assert_eq!(stored["name"], format!("Edited {user}"));
    }
}

on_every_store!(stripe_faults_lose_nothing_and_duplicate_nothing);
