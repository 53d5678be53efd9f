//! The HTTP edge as a browser and a proxy see it: CORS on the user routes only, for the exact
//! configured origins, and request ids accepted, generated and returned.

use crate::support;

use reqwest::{header, Method};
use support::TestApp;

const ALLOWED: &str = "https://app.example.com";

async fn app() -> (TestApp, support::TestStore) {
    let store = support::sqlite_store().await;
    let mut config = support::test_config("http://127.0.0.1:9");
    config.cors_origins = vec![ALLOWED.into(), "http://localhost:3000".into()];
    (TestApp::spawn(store.store.clone(), &config).await, store)
}

async fn preflight(app: &TestApp, path: &str, origin: &str, method: &str) -> reqwest::Response {
    app.http
        .request(Method::OPTIONS, app.url(path))
        .header(header::ORIGIN, origin)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, method)
        .header(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflights_from_configured_origins_are_allowed_with_credentials() {
    let (app, _store) = app().await;
    for (path, method) in [
        ("/api/user/profile", "PUT"),
        ("/api/billing/create-portal-session", "POST"),
        ("/api/user/export-data", "GET"),
        ("/api/user/delete-account", "DELETE"),
    ] {
        let response = preflight(&app, path, ALLOWED, method).await;
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        let headers = response.headers();
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], ALLOWED);
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        let methods = headers[header::ACCESS_CONTROL_ALLOW_METHODS]
            .to_str()
            .unwrap();
        assert!(methods.contains(method), "{methods}");
        let allowed_headers = headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
            .to_str()
            .unwrap()
            .to_ascii_lowercase();
        assert!(
            allowed_headers.contains("authorization"),
            "{allowed_headers}"
        );
    }
    // An actual cross-origin call gets the header too (its 401 is readable by the page).
    let response = app
        .http
        .put(app.url("/api/user/profile"))
        .header(header::ORIGIN, "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "http://localhost:3000"
    );
    let exposed = response.headers()[header::ACCESS_CONTROL_EXPOSE_HEADERS]
        .to_str()
        .unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_origins_and_non_user_routes_get_no_cors() {
    let (app, _store) = app().await;
    for origin in [
        "https://evil.example.com",
        "https://app.example.com.evil.io",
        "null",
    ] {
        let response = preflight(&app, "/api/user/profile", origin, "PUT").await;
        assert!(
            !response
                .headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
            "{origin}"
        );
    }
    for path in ["/v1/users/u1", "/api/webhooks/stripe", "/metrics"] {
        let response = preflight(&app, path, ALLOWED, "POST").await;
        assert!(
            !response
                .headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
            "{path} must not be callable from a browser"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_configured_origin_means_no_cross_origin_access() {
    let store = support::sqlite_store().await;
    let app = TestApp::spawn(
        store.store.clone(),
        &support::test_config("http://127.0.0.1:9"),
    )
    .await;
    let response = preflight(&app, "/api/user/profile", ALLOWED, "PUT").await;
    assert!(!response
        .headers()
        .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_kept_generated_or_replaced() {
    let (app, _store) = app().await;
    let id_of = |response: &reqwest::Response| {
        response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let kept = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "app-trace-42.a:b_c")
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(&kept), "app-trace-42.a:b_c");
    let generated = app.http.get(app.url("/healthz")).send().await.unwrap();
    let other = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(id_of(&generated).len(), 36, "a UUID");
    assert_ne!(id_of(&generated), id_of(&other));
    for unusable in ["two words", "x".repeat(129).as_str(), "quote\"d", "{json}"] {
        let response = app
            .http
            .get(app.url("/healthz"))
            .header("x-request-id", unusable)
            .send()
            .await
            .unwrap();
        assert_eq!(id_of(&response).len(), 36, "{unusable} replaced");
    }
    // Errors carry it too.
    let missing = app.http.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(id_of(&missing).len(), 36);
}

/// A server with tight limits, and raw TCP to misbehave with.
async fn limited(
    header_secs: u64,
    body_secs: u64,
    connections: usize,
) -> (TestApp, support::TestStore) {
    let store = support::sqlite_store().await;
    let mut config = support::test_config("http://127.0.0.1:9");
    config.server.header_read_timeout = std::time::Duration::from_secs(header_secs);
    config.server.max_connections = connections;
    config.body_read_timeout = std::time::Duration::from_secs(body_secs);
    (TestApp::spawn(store.store.clone(), &config).await, store)
}

async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|()| String::from_utf8_lossy(&received).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let (app, _store) = limited(1, 30, 64).await;
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: billsync\r\nX-Slow: ")
        .await
        .unwrap();
    // Never finishes its headers: the server closes the connection after its deadline.
    let answer = read_until_closed(&mut stream, std::time::Duration::from_secs(5))
        .await
        .expect("the server closed the connection");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    assert!(!answer.contains("200 OK"), "{answer}");

    // An idle keep-alive connection is closed the same way, freeing its slot.
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: billsync\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut idle, std::time::Duration::from_secs(5))
        .await
        .expect("an idle connection is closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_gets_408() {
    use tokio::io::AsyncWriteExt;
    let (app, _store) = limited(10, 1, 64).await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "PUT /v1/users/slow HTTP/1.1\r\nHost: billsync\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"email\":",
                support::ADMIN_KEY
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream, std::time::Duration::from_secs(5))
        .await
        .unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let (app, _store) = limited(10, 30, 64).await;
    let response = app
        .http
        .get(app.url("/healthz"))
        .header("x-padding", "a".repeat(20 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    // Headers under the limit are fine.
    let response = app
        .http
        .get(app.url("/healthz"))
        .header("x-padding", "a".repeat(8 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_for_a_free_slot() {
    use tokio::io::AsyncWriteExt;
    let (app, _store) = limited(30, 30, 2).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: billsync\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(stream); // kept open: keep-alive holds the slot
    }
    let mut third = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: billsync\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut third, std::time::Duration::from_millis(700))
            .await
            .is_none(),
        "the third connection is not served while two are open"
    );
    drop(held.pop());
    let answer = read_until_closed(&mut third, std::time::Duration::from_secs(5))
        .await
        .expect("served once a slot is free");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
