//! The HTTP edge as a browser and a proxy see it: CORS on the user routes only, for the exact
//! configured origins, and request ids accepted, generated and returned.

mod support;

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
