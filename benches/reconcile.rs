//! Reconciliation benchmark: `billsync reconcile` (release binary) against a wiremock Stripe
//! that lists CUSTOMERS customers (default 10,000) at LATENCY_MS per page (default 50), with a
//! linked user for each in SQLite, but every 100th customer, which names a user that does not
//! exist (an orphan: the report keeps those). Shows whether the run is bound by the rate limit
//! (pages/s against the allowed requests/s) and the process's peak RSS. Run:
//! `cargo bench --bench reconcile`; `RPS=200 LATENCY_MS=0 CUSTOMERS=1000000 cargo bench --bench
//! reconcile` for an account of a million customers.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;
use wiremock::{
    matchers::{method, path},
    Mock, MockServer, Request, Respond, ResponseTemplate,
};

const PAGE: usize = 100;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Pages of `GET /v1/customers?limit=100&starting_after=cus_…`, in id order.
struct Pages {
    ids: Vec<String>,
    latency: Duration,
}

impl Respond for Pages {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let after = request
            .url
            .query_pairs()
            .find(|(k, _)| k == "starting_after")
            .map(|(_, v)| v.into_owned());
        let start = match after {
            Some(id) => self.ids.binary_search(&id).map_or(0, |i| i + 1),
            None => 0,
        };
        let end = (start + PAGE).min(self.ids.len());
        let data: Vec<_> = self.ids[start..end]
            .iter()
            .map(|id| {
                let n = &id["cus_bench".len()..];
                let user = if n.ends_with("00") {
                    format!("gone-{n}")
                } else {
                    format!("user-{n}")
                };
                json!({"id": id, "object": "customer", "email": format!("user-{n}@example.com"),
                       "name": null, "phone": null, "livemode": false, "created": 1_700_000_000,
                       "metadata": {"userId": user}})
            })
            .collect();
        ResponseTemplate::new(200)
            .set_delay(self.latency)
            .set_body_json(
                json!({"object": "list", "data": data, "has_more": end < self.ids.len()}),
            )
    }
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() {
    let rps = setting("RPS", 20) as u32;
    let customers = setting("CUSTOMERS", 10_000) as usize;
    let latency = Duration::from_millis(setting("LATENCY_MS", 50));
    let mut ids: Vec<String> = (0..customers).map(|i| format!("cus_bench{i:07}")).collect();
    ids.sort();
    let stripe = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .respond_with(Pages { ids, latency })
        .mount(&stripe)
        .await;
    // The subscriptions phase: none in this account (one page).
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "data": [], "has_more": false})),
        )
        .mount(&stripe)
        .await;

    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = billsync::store::connect(&database, 4).await.unwrap();
    store.migrate().await.unwrap();
    drop(store);
    let pool = sqlx::SqlitePool::connect(&database).await.unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    sqlx::query(&format!(
        "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {customers} - 1)
         INSERT INTO users (id, email, email_verified, version, created_at, updated_at)
         SELECT printf('user-%07d', i), printf('user-%07d@example.com', i), 1, 1, {now}, {now}
         FROM s WHERE i % 100 <> 0"
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {customers} - 1)
         INSERT INTO customer_links (user_id, stripe_customer_id, livemode, linked_via, linked_at)
         SELECT printf('user-%07d', i), printf('cus_bench%07d', i), 0, 'created', {now}
         FROM s WHERE i % 100 <> 0"
    ))
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let report = dir.path().join("report.json");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_billsync"))
        .args(["reconcile", "--json", report.to_str().unwrap()])
        .env("DATABASE_URL", &database)
        .env("STRIPE_SECRET_KEY", "sk_test_bench")
        .env("BILLSYNC_STRIPE_API_BASE", stripe.uri())
        .env("BILLSYNC_STRIPE_RPS", rps.to_string())
        // The process budget would cap an RPS above its default; the fake has no limit.
        .env("BILLSYNC_STRIPE_BUDGET_RPS", "1000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elapsed = started.elapsed().as_secs_f64();
    let mut table = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut table).unwrap();
    assert!(status.success(), "reconcile failed");
    let pages = stripe.received_requests().await.unwrap().len();
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let orphans = customers.div_ceil(100);
    assert_eq!(written["summary"]["ok"]["found"], customers - orphans);
    assert_eq!(written["summary"]["orphan"]["found"], orphans);
    assert_eq!(written["findings"].as_array().unwrap().len(), orphans);
    let pages_per_sec = pages as f64 / elapsed;
    println!("{table}");
    println!(
        "reconcile: {customers} customers, {pages} pages of {PAGE} at {} ms each, limit {rps} req/s",
        latency.as_millis()
    );
    println!(
        "elapsed {elapsed:.2} s (process start to exit), {pages_per_sec:.1} pages/s = {:.0} % of the limit; peak RSS {} MiB",
        100.0 * pages_per_sec / f64::from(rps),
        peak / 1024
    );
}
