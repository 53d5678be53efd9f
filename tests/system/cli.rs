//! The `billsync` binary itself: start-up validation, migrate, resolve, graceful shutdown.

use crate::support::{self, process::free_port};

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// The binary with no configuration from the environment running the tests.
pub(crate) fn billsync() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_billsync"));
    // Start from nothing: no configuration leaks in from the environment running the tests.
    for (key, _) in std::env::vars() {
        if key.starts_with("BILLSYNC_") || key.starts_with("STRIPE_") || key == "DATABASE_URL" {
            command.env_remove(key);
        }
    }
    command.env("RUST_LOG", "warn");
    command
}

#[test]
fn serve_refuses_to_start_without_a_valid_stripe_key() {
    let dir = tempfile::tempdir().unwrap();
    let output = billsync()
        .current_dir(dir.path())
        .arg("serve")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    assert!(stderr.contains("STRIPE_SECRET_KEY is not set"), "{stderr}");

    let output = billsync()
        .current_dir(dir.path())
        .env("STRIPE_SECRET_KEY", "pk_live_publishable_key_value")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("sk_") && !stderr.contains("pk_live_publishable_key_value"),
        "{stderr}"
    );
    // Nothing was created before validation failed.
    assert!(!dir.path().join("billsync.db").exists());
}

#[test]
fn bad_settings_are_named() {
    let output = billsync()
        .env("BILLSYNC_LISTEN", "not-an-address")
        .env("STRIPE_SECRET_KEY", "sk_test_x")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("BILLSYNC_LISTEN"));
}

#[test]
fn app_event_settings_are_checked_naming_the_setting() {
    let serve = |settings: &[(&str, &str)]| {
        let output = billsync()
            .env("STRIPE_SECRET_KEY", "sk_test_x")
            .envs(settings.iter().copied())
            .arg("serve")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{settings:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let url = ("BILLSYNC_APP_WEBHOOK_URL", "https://app.example.com/hooks");
    let secret = (
        "BILLSYNC_APP_WEBHOOK_SECRET",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    );
    assert!(serve(&[url]).contains("BILLSYNC_APP_WEBHOOK_SECRET must be set"));
    let plain = ("BILLSYNC_APP_WEBHOOK_URL", "http://app.example.com/hooks");
    assert!(serve(&[plain, secret]).contains("BILLSYNC_APP_WEBHOOK_URL must be an https://"));
    let short = ("BILLSYNC_APP_WEBHOOK_SECRET", "whsec_c2hvcnQ=");
    let refused = serve(&[url, short]);
    assert!(
        refused.contains("BILLSYNC_APP_WEBHOOK_SECRET: a secret holds 5 bytes"),
        "{refused}"
    );
    assert!(
        !refused.contains("c2hvcnQ"),
        "the secret is not shown: {refused}"
    );
    let dir = tempfile::tempdir().unwrap();
    let plans = dir.path().join("plans.toml");
    std::fs::write(&plans, "[[plans]]\nid = \"pro\"\nprices = [\"prce_1\"]\n").unwrap();
    let bad_plan = serve(&[("BILLSYNC_PLANS_FILE", plans.to_str().unwrap())]);
    assert_eq!(
        bad_plan.trim(),
        "billsync: BILLSYNC_PLANS_FILE: plans[0].prices[0]: `prce_1` is neither a price id \
         (price_…) nor lookup:<lookup_key>"
    );
}

#[test]
fn app_events_new_secret_prints_a_standard_webhooks_secret() {
    use base64::Engine as _;
    let secrets: Vec<String> = (0..2)
        .map(|_| {
            let output = billsync()
                .args(["app-events", "new-secret"])
                .output()
                .unwrap();
            assert!(output.status.success());
            String::from_utf8(output.stdout).unwrap().trim().to_owned()
        })
        .collect();
    assert_ne!(secrets[0], secrets[1]);
    for secret in &secrets {
        let key = secret.strip_prefix("whsec_").expect("whsec_ prefix");
        let key = base64::engine::general_purpose::STANDARD
            .decode(key)
            .unwrap();
        assert_eq!(key.len(), 32);
    }
}

#[test]
fn openapi_prints_the_document_the_server_serves() {
    let dir = tempfile::tempdir().unwrap();
    let out = billsync()
        .current_dir(dir.path())
        .arg("openapi")
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert!(doc["paths"]["/v1/users/batch"]["post"].is_object());
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(
        !dir.path().join("billsync.db").exists(),
        "no database is opened"
    );
}

#[test]
fn migrate_creates_the_sqlite_default() {
    let dir = tempfile::tempdir().unwrap();
    let status = billsync()
        .current_dir(dir.path())
        .arg("migrate")
        .status()
        .unwrap();
    assert!(status.success());
    assert!(dir.path().join("billsync.db").exists());
    // Twice is fine.
    assert!(billsync()
        .current_dir(dir.path())
        .arg("migrate")
        .status()
        .unwrap()
        .success());
}

/// `billsync serve` on the SQLite default in `dir`, listening on `port`.
fn serve_in(dir: &std::path::Path, port: u16) -> Command {
    let mut command = billsync();
    command
        .current_dir(dir)
        .env("STRIPE_SECRET_KEY", "sk_test_x")
        .env("BILLSYNC_LISTEN", format!("127.0.0.1:{port}"))
        .arg("serve");
    command
}

/// Waits until `port` accepts a connection, polling every `poll`.
fn wait_until_listening(port: u16, poll: Duration) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(poll);
    }
}

/// Sends SIGTERM and waits for the process to end.
fn stop_with_sigterm(child: &mut std::process::Child) -> std::process::ExitStatus {
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            return exit;
        }
        assert!(
            Instant::now() < deadline,
            "server did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = serve_in(dir.path(), port)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_listening(port, Duration::from_millis(50));
    assert!(
        dir.path().join("billsync.db").exists(),
        "the SQLite default is created on start"
    );
    // A second server on the same SQLite file is refused, with one line saying why.
    let second = serve_in(dir.path(), free_port()).output().unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second serve started: {said}");
    assert!(
        said.contains("another billsync process is serving") && said.contains("billsync.db"),
        "{said}"
    );
    let exit = stop_with_sigterm(&mut child);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(exit.success(), "exit {exit:?}: {stderr}");
}

/// The moment the port answers, SIGTERM is a clean stop: the handlers are in place before
/// the listener is bound. (They used to be registered when the server loop first polled them,
/// so a loaded machine could deliver the signal in between and the process died by it.)
#[test]
fn sigterm_the_moment_the_port_answers_is_a_clean_stop() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut child = serve_in(dir.path(), port)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until_listening(port, Duration::from_millis(2));
        let exit = stop_with_sigterm(&mut child);
        assert!(exit.success(), "exit {exit:?}");
    }
}

#[test]
fn customer_resolve_prints_one_id_per_user() {
    let Some(stripe) = support::localstripe_url("customer_resolve_prints_one_id_per_user") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let user = support::unique("cli");
    let email = format!("{user}@example.com");
    let run = |with_email: bool| {
        let mut command = billsync();
        command
            .current_dir(dir.path())
            .env("STRIPE_SECRET_KEY", support::STRIPE_KEY)
            .env("BILLSYNC_STRIPE_API_BASE", &stripe)
            .args(["customer", "resolve", "--user", &user]);
        if with_email {
            command.args(["--email", &email]);
        }
        command.output().unwrap()
    };
    let unknown = run(false);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not found"));

    let first = run(true);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let id = String::from_utf8(first.stdout).unwrap();
    assert!(
        id.trim().starts_with("cus_") && id.lines().count() == 1,
        "{id:?}"
    );
    let second = run(false);
    assert_eq!(String::from_utf8(second.stdout).unwrap(), id);
}

#[test]
fn export_and_erase_share_the_routes_code() {
    let Some(stripe) = support::localstripe_url("export_and_erase_share_the_routes_code") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let user = support::unique("cli-gdpr");
    let email = format!("{user}@example.com");
    let run = |args: &[&str]| {
        billsync()
            .current_dir(dir.path())
            .env("STRIPE_SECRET_KEY", support::STRIPE_KEY)
            .env("BILLSYNC_STRIPE_API_BASE", &stripe)
            .args(args)
            .output()
            .unwrap()
    };
    let resolved = run(&["customer", "resolve", "--user", &user, "--email", &email]);
    assert!(resolved.status.success());
    let customer = String::from_utf8(resolved.stdout)
        .unwrap()
        .trim()
        .to_owned();

    let exported = run(&["export", "--user", &user]);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let export: serde_json::Value =
        serde_json::from_slice(&exported.stdout).expect("one JSON document");
    assert_eq!(export["user_profile"]["id"], user.as_str());
    assert_eq!(export["stripe_customer"]["id"], customer.as_str());
    assert_eq!(export["usage_records"], serde_json::json!([]));

    let erased = run(&["erase", "--user", &user, "--delete-stripe-customer"]);
    assert!(
        erased.status.success(),
        "{}",
        String::from_utf8_lossy(&erased.stderr)
    );
    assert_eq!(String::from_utf8(erased.stdout).unwrap().trim(), "erased");
    let status = reqwest::blocking_status(&format!("{stripe}/v1/customers/{customer}"));
    assert_eq!(status, 404, "the Stripe customer is deleted");

    let gone = run(&["export", "--user", &user]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not found"));
    // Erasing again is fine.
    assert!(run(&["erase", "--user", &user]).status.success());
}

mod reqwest {
    /// A GET from a plain thread (these tests are synchronous).
    pub fn blocking_status(url: &str) -> u16 {
        let url = url.to_owned();
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                ::reqwest::Client::new()
                    .get(url)
                    .basic_auth(super::support::STRIPE_KEY, Some(""))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .join()
        .unwrap()
    }
}

#[test]
fn events_replay_requeues_stored_events() {
    let dir = tempfile::tempdir().unwrap();
    assert!(billsync()
        .current_dir(dir.path())
        .arg("migrate")
        .status()
        .unwrap()
        .success());
    let run = |args: &[&str]| {
        billsync()
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    let failed = run(&["events", "replay", "--failed"]);
    assert!(failed.status.success());
    assert_eq!(
        String::from_utf8_lossy(&failed.stdout).trim(),
        "0 failed events queued again"
    );
    let missing = run(&["events", "replay", "--id", "evt_missing"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no event evt_missing"));
    // One of the two is required.
    assert!(!run(&["events", "replay"]).status.success());
}
