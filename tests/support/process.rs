//! A real `billsync serve` process for tests that kill it or run several.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub fn log_path(port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("billsync-crash-{port}.log"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server process; killed when dropped, so a failing test leaves nothing running.
pub struct Server(Child);

impl Server {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn start_with(database_url: &str, port: u16, settings: &[(&str, String)]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_billsync"));
    for (key, _) in std::env::vars() {
        if key.starts_with("BILLSYNC_") || key.starts_with("STRIPE_") || key == "DATABASE_URL" {
            command.env_remove(key);
        }
    }
    command
        .env("DATABASE_URL", database_url)
        .env("STRIPE_SECRET_KEY", super::STRIPE_KEY)
        .env("STRIPE_WEBHOOK_SECRET", super::WEBHOOK_SECRET)
        .env("BILLSYNC_STRIPE_API_BASE", "http://127.0.0.1:9")
        .env("BILLSYNC_LISTEN", format!("127.0.0.1:{port}"))
        .env("BILLSYNC_OUTBOX_POLL_MS", "20")
        // A fake Stripe has no rate limit to protect; the budget's own tests set theirs.
        .env("BILLSYNC_STRIPE_BUDGET_RPS", "1000")
        .env("RUST_LOG", "warn")
        .envs(settings.iter().map(|(k, v)| (*k, v.as_str())))
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_path(port)).expect("log file"))
        .spawn()
        .map(Server)
        .expect("start billsync")
}

pub async fn wait_ready(port: u16) {
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
