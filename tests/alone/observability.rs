//! What an operator sees: `/metrics` moving by exactly what a scripted workload did, and the
//! real binary's logs (JSON, a request id on each request line, secrets redacted, emails and
//! phone numbers masked). In `tests/alone`, one test at a time: the metrics recorder is
//! process-wide.

use crate::support;

use std::{
    io::Read,
    process::{Command, Stdio},
    time::Duration,
};

use reqwest::Method;
use serde_json::{json, Value};
use support::{eventually, TestApp};
use wiremock::{
    matchers::{method, path},
    Mock, MockServer, ResponseTemplate,
};

/// The sum of the samples of `name` whose labels include every pair of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, l)) => (n, l),
                None => (series, ""),
            };
            (series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

async fn scrape(app: &TestApp) -> String {
    let response = app.admin(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    response.text().await.unwrap()
}

async fn deliver(app: &TestApp, body: &str, signature: Option<String>) -> u16 {
    app.http
        .post(app.url("/api/webhooks/stripe"))
        .header(
            "stripe-signature",
            signature.unwrap_or_else(|| support::stripe_signature(support::WEBHOOK_SECRET, body)),
        )
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn updated(id: &str, created: i64, customer: &str, name: &str) -> String {
    json!({"id": id, "object": "event", "type": "customer.updated", "created": created,
           "livemode": false,
           "data": {"object": {"id": customer, "object": "customer", "name": name,
                               "email": format!("{customer}@example.com"), "metadata": {}}}})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_what_the_workload_did() {
    let _alone = crate::one_at_a_time().await;
    let store = support::sqlite_store().await;
    let stripe = MockServer::start().await;
    let app = TestApp::spawn(store.store.clone(), &support::test_config(&stripe.uri())).await;
    Mock::given(method("POST"))
        .and(path("/v1/customers/cus_metrics_ok"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "cus_metrics_ok", "object": "customer"})),
        )
        .mount(&stripe)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/customers/cus_metrics_bad"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": {"type": "invalid_request_error", "message": "Invalid phone"}}),
        ))
        .mount(&stripe)
        .await;
    for (user, customer) in [("m-ok", "cus_metrics_ok"), ("m-bad", "cus_metrics_bad")] {
        app.put_user(user, json!({"email": format!("{customer}@example.com")}))
            .await;
        support::link_in_store(app.state.store.as_ref(), user, customer).await;
    }
    let before = scrape(&app).await;

    // Two profile edits: one push lands, one is refused by Stripe (400: parked, not retried).
    for user in ["m-ok", "m-bad"] {
        app.put_user(
            user,
            json!({"email": format!("{user}@example.com"), "first_name": "Edited"}),
        )
        .await;
    }
    eventually(10, "both pushes finished", || async {
        let jobs: Value = app
            .admin(Method::GET, "/v1/outbox?limit=10")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let finished = jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "done" || j["state"] == "failed")
            .count();
        (finished == 2).then_some(())
    })
    .await;
    // Webhooks: three stored, one redelivered, one skipped type, one forged.
    let first = updated("evt_m1", 1_000, "cus_metrics_ok", "One Name");
    for body in [
        first.clone(),
        updated("evt_m2", 1_001, "cus_metrics_ok", "Two Name"),
        updated("evt_m3", 1_002, "cus_metrics_ok", "Three Name"),
        first,
        json!({"id": "evt_m4", "type": "invoice.paid", "created": 1_003, "livemode": false,
               "data": {"object": {"id": "in_1", "object": "invoice"}}})
        .to_string(),
    ] {
        assert_eq!(deliver(&app, &body, None).await, 200);
    }
    let forged = format!(
        "t={},v1={}",
        time::OffsetDateTime::now_utc().unix_timestamp(),
        "0".repeat(64)
    );
    assert_eq!(deliver(&app, "{}", Some(forged)).await, 400, "forged");
    eventually(10, "the events applied", || async {
        let text = scrape(&app).await;
        (sample(&text, "billsync_webhook_events_applied_total", &[])
            - sample(&before, "billsync_webhook_events_applied_total", &[])
            >= 3.0)
            .then_some(())
    })
    .await;
    // A scrape reads the queue gauges before it renders the counters, so the scrape that saw
    // the last event counted may have read the queue before that event's commit. The next
    // one reads it after.
    let after = scrape(&app).await;

    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    let put = [
        ("method", "PUT"),
        ("route", "/v1/users/{user_id}"),
        ("status", "200"),
    ];
    assert_eq!(delta("billsync_http_requests_total", &put), 2.0);
    assert_eq!(
        delta(
            "billsync_http_request_duration_seconds_count",
            &[("method", "PUT"), ("route", "/v1/users/{user_id}")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            "billsync_http_requests_total",
            &[("route", "/api/webhooks/stripe"), ("status", "200")]
        ),
        5.0
    );
    assert!(
        !after.contains("m-ok") && !after.contains("cus_metrics"),
        "ids never become labels"
    );
    assert_eq!(
        delta(
            "billsync_stripe_requests_total",
            &[("operation", "customers.update"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "billsync_stripe_requests_total",
            &[
                ("operation", "customers.update"),
                ("outcome", "client_error")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "billsync_stripe_request_duration_seconds_count",
            &[("operation", "customers.update")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            "billsync_outbox_jobs_total",
            &[("kind", "push_profile"), ("outcome", "done")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "billsync_outbox_jobs_total",
            &[("kind", "push_profile"), ("outcome", "failed")]
        ),
        1.0
    );
    assert_eq!(sample(&after, "billsync_outbox_failed_jobs", &[]), 1.0);
    assert_eq!(sample(&after, "billsync_outbox_depth", &[]), 0.0);
    for (result, count) in [("stored", 3.0), ("duplicate", 1.0), ("skipped", 1.0)] {
        assert_eq!(
            delta(
                "billsync_webhook_events_received_total",
                &[("result", result)]
            ),
            count,
            "{result}"
        );
    }
    assert_eq!(
        delta(
            "billsync_webhook_rejections_total",
            &[("code", "invalid_signature")]
        ),
        1.0
    );
    assert_eq!(delta("billsync_webhook_events_applied_total", &[]), 3.0);
    assert!(delta("billsync_webhook_apply_lag_seconds_count", &[]) >= 1.0);
    assert_eq!(sample(&after, "billsync_webhook_events_pending", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_admin_key() {
    let _alone = crate::one_at_a_time().await;
    let store = support::sqlite_store().await;
    let app = TestApp::spawn(
        store.store.clone(),
        &support::test_config("http://127.0.0.1:9"),
    )
    .await;
    let response = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 401);
}

/// The real binary, JSON logs, debug level: every line is JSON; the request's lines carry its
/// id; a Stripe error quoting the user's email and phone is logged masked; no secret appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_request_ids_and_never_secrets_or_contact_details() {
    let _alone = crate::one_at_a_time().await;
    let stripe = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "data": [], "has_more": false})),
        )
        .mount(&stripe)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"id": "cus_logs", "object": "customer", "email": "leak.check@example.com"}),
        ))
        .mount(&stripe)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/customers/cus_logs"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "type": "invalid_request_error",
            "message": "Invalid phone +14155550123 for leak.check@example.com"}})))
        .mount(&stripe)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_billsync"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("b.db").display()),
        )
        .env("BILLSYNC_LISTEN", format!("127.0.0.1:{port}"))
        .env("STRIPE_SECRET_KEY", support::STRIPE_KEY)
        .env("BILLSYNC_STRIPE_API_BASE", stripe.uri())
        .env("BILLSYNC_ADMIN_API_KEY", support::ADMIN_KEY)
        .env("BILLSYNC_JWT_SECRET", support::JWT_SECRET)
        .env("STRIPE_WEBHOOK_SECRET", support::WEBHOOK_SECRET)
        .env("BILLSYNC_OUTBOX_POLL_MS", "20")
        .env("BILLSYNC_OUTBOX_DEBOUNCE_MS", "50")
        .env("BILLSYNC_LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained as it is written: at debug level the server writes more than a pipe holds, and
    // a full pipe would stall it.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut logs = String::new();
        stderr.read_to_string(&mut logs).unwrap();
        logs
    });
    let http = reqwest::Client::new();
    eventually(20, "server up", || async {
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    let admin = |method: Method, path: &str| {
        http.request(method, format!("{base}{path}"))
            .bearer_auth(support::ADMIN_KEY)
            .header("x-request-id", "req-logs-0001")
    };
    let put = |phone: &'static str| {
        admin(Method::PUT, "/v1/users/logs-user").json(&json!({
            "email": "leak.check@example.com", "email_verified": true, "phone": phone}))
    };
    assert_eq!(put("+14155550100").send().await.unwrap().status(), 200);
    let resolved = admin(Method::POST, "/v1/users/logs-user/customer")
        .send()
        .await
        .unwrap();
    assert!(resolved.status().is_success(), "{}", resolved.status());
    assert_eq!(put("+14155550123").send().await.unwrap().status(), 200);
    let forged = http
        .post(format!("{base}/api/webhooks/stripe"))
        .header("x-request-id", "bad id with spaces")
        .header("stripe-signature", "t=1,v1=00")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);
    let generated = forged.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(generated, "bad id with spaces");
    eventually(10, "the push was refused and logged", || async {
        let jobs: Value = admin(Method::GET, "/v1/outbox?state=failed")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (jobs["jobs"].as_array()?.len() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let logs = reader.join().unwrap();

    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let of_request = |id: &str| {
        lines
            .iter()
            .filter(|l| l["span"]["request_id"] == id)
            .count()
    };
    assert!(
        of_request("req-logs-0001") >= 6,
        "each admin request logs its start and end under its id:\n{logs}"
    );
    assert!(of_request(&generated) >= 2, "{logs}");
    assert!(!logs.contains("bad id with spaces"));
    for secret in [
        support::STRIPE_KEY,
        support::ADMIN_KEY,
        support::JWT_SECRET,
        support::WEBHOOK_SECRET,
    ] {
        assert!(!logs.contains(secret), "secret {secret} logged");
    }
    assert!(
        logs.contains("l***@example.com") && logs.contains("+*******0123"),
        "Stripe's message is logged, masked:\n{logs}"
    );
    assert!(!logs.contains("leak.check@example.com") && !logs.contains("+14155550123"));
}
