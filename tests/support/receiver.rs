//! The app's side of app-event tests: `tests/receiver/receiver.mjs`, a Node server that
//! verifies every delivery with the official `standardwebhooks` package (`npm ci --prefix
//! tests/receiver`; `scripts/test.sh` installs it).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::skip;

/// A fixed Standard Webhooks secret for tests (32 bytes of key).
pub const APP_WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo=";

fn receiver_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/receiver")
}

/// A running receiver; killed when dropped.
pub struct Receiver {
    pub(super) child: Option<Child>,
    pub port: u16,
    pub(super) http: reqwest::Client,
    /// What earlier processes on this port received, kept across a restart.
    pub(super) earlier: Vec<Value>,
}

impl Receiver {
    /// Starts one on a free port, or reports the test skipped when Node or the package is
    /// missing.
    pub fn start(test: &str) -> Option<Self> {
        if !receiver_dir()
            .join("node_modules/standardwebhooks")
            .exists()
        {
            skip(
                test,
                "tests/receiver has no node_modules (run npm ci --prefix tests/receiver)",
            );
            return None;
        }
        let mut receiver = Self {
            child: None,
            port: 0,
            http: reqwest::Client::new(),
            earlier: Vec::new(),
        };
        receiver.spawn(0);
        Some(receiver)
    }

    pub(super) fn spawn(&mut self, port: u16) {
        let mut child = Command::new("node")
            .arg(receiver_dir().join("receiver.mjs"))
            .arg(port.to_string())
            .arg(APP_WEBHOOK_SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node tests/receiver/receiver.mjs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("receiver stdout"))
            .read_line(&mut line)
            .expect("receiver prints its port");
        self.port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver did not start: {line:?}"));
        self.child = Some(child);
    }

    /// The endpoint billsync delivers to.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Every delivery so far, including those before a restart.
    pub async fn received(&self) -> Vec<Value> {
        let mut all = self.earlier.clone();
        if self.child.is_some() {
            let now: Vec<Value> = self
                .http
                .get(format!("http://127.0.0.1:{}/_received", self.port))
                .send()
                .await
                .expect("read the receiver")
                .json()
                .await
                .expect("receiver JSON");
            all.extend(now);
        }
        all
    }

    /// The deliveries that a 2xx answered: the receiver's mode was `ok` when they came.
    pub async fn accepted(&self) -> Vec<Value> {
        let mut accepted: Vec<Value> = self.received().await;
        accepted.retain(|d| d["mode"] == "ok");
        accepted
    }

    /// Waits until `done` holds for the accepted deliveries, or panics with them after `within`.
    pub async fn wait_for(&self, within: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let accepted = self.accepted().await;
            if done(&accepted) {
                return accepted;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver did not get what was expected in {within:?}; it has: {:#?}",
                accepted
                    .iter()
                    .map(|d| (&d["type"], &d["key"]))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Verifies a delivery again with the library: as it came, `shift_secs` later (a replay).
    pub async fn verify(&self, body: &str, headers: &Value, shift_secs: i64) -> Value {
        self.http
            .post(format!("http://127.0.0.1:{}/_verify", self.port))
            .json(&json!({ "body": body, "headers": headers, "shift_secs": shift_secs }))
            .send()
            .await
            .expect("ask the receiver to verify")
            .json()
            .await
            .expect("receiver JSON")
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The accepted deliveries about `key`, each event once, in the order they arrived.
pub fn of_key<'a>(deliveries: &'a [Value], key: &str) -> Vec<&'a Value> {
    let mut seen = std::collections::HashSet::new();
    deliveries
        .iter()
        .filter(|d| d["key"] == key && seen.insert(d["id"].as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// A delivery's body, parsed.
pub fn body(delivery: &Value) -> Value {
    serde_json::from_str(delivery["body"].as_str().expect("a body")).expect("a JSON body")
}

/// `config`, delivering to `receiver` with short timeouts and backoffs, and `plans`.
pub fn delivering_to(
    mut config: billsync::config::Config,
    receiver: &Receiver,
    plans: Option<&std::path::Path>,
) -> billsync::config::Config {
    config.app_events = billsync::config::settings::AppEventSettings {
        app_webhook_url: Some(receiver.url().as_str().into()),
        app_webhook_secret: Some(APP_WEBHOOK_SECRET.into()),
        app_webhook_timeout_ms: Some(500),
        app_webhook_backoff_base_ms: Some(100),
        app_webhook_backoff_max_secs: Some(1),
        app_events_poll_ms: Some(20),
        plans_file: plans.map(std::path::Path::to_path_buf),
        ..Default::default()
    }
    .resolve()
    .expect("app event settings");
    config
}
