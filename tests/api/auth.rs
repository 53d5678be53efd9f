//! User authentication through the real server: every way a token can be wrong is refused,
//! the right ones are accepted, and a user only ever reaches their own data.

use crate::support;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{json, Value};
use support::TestApp;
use wiremock::{matchers::path, Mock, MockServer, ResponseTemplate};

const DEAD_STRIPE: &str = "http://127.0.0.1:9";

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "aud": "authenticated", "exp": now() + 600, "email": format!("{sub}@example.com")})
}

fn jwk(name: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(format!("tests/fixtures/jwt/{name}.jwk.json")).unwrap(),
    )
    .unwrap()
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rsa(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(format!("tests/fixtures/jwt/{name}.pem")).unwrap())
        .unwrap()
}

fn ec(name: &str) -> EncodingKey {
    EncodingKey::from_ec_pem(&std::fs::read(format!("tests/fixtures/jwt/{name}.pem")).unwrap())
        .unwrap()
}

/// An app with HS256 and a JWKS (served by wiremock) configured.
async fn app(jwks_keys: &[&str]) -> (TestApp, MockServer, support::TestStore) {
    let jwks = MockServer::start().await;
    serve_jwks(&jwks, jwks_keys).await;
    let store = support::sqlite_store().await;
    let mut config = support::test_config(DEAD_STRIPE);
    config.jwt.jwks_url = Some(format!("{}/jwks.json", jwks.uri()));
    (
        TestApp::spawn(store.store.clone(), &config).await,
        jwks,
        store,
    )
}

async fn serve_jwks(server: &MockServer, names: &[&str]) {
    server.reset().await;
    let keys: Vec<Value> = names.iter().map(|n| jwk(n)).collect();
    Mock::given(path("/jwks.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"keys": keys})))
        .mount(server)
        .await;
}

/// `PUT /api/user/profile` with this token: the status and error code, if any.
async fn try_token(app: &TestApp, token: &str) -> (u16, Option<String>) {
    let (status, body) = support::status_and_json(
        app.as_user(Method::PUT, "/api/user/profile", token)
            .json(&json!({"firstName": "Token"})),
    )
    .await;
    (status, body["error"]["code"].as_str().map(str::to_owned))
}

fn unauthorized() -> (u16, Option<String>) {
    (401, Some("unauthorized".into()))
}

#[tokio::test]
async fn a_valid_hs256_token_works_and_creates_the_user_from_its_claims() {
    let (app, _jwks, _s) = app(&[]).await;
    let token = support::user_token("hs-user", Some("HS@Example.com"), Some(json!(true)));
    assert_eq!(try_token(&app, &token).await, (200, None));
    let user: Value = app
        .admin(Method::GET, "/v1/users/hs-user")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(user["user"]["email"], "hs@example.com");
    assert_eq!(user["user"]["email_verified"], true);
    assert_eq!(user["user"]["first_name"], "Token");
}

#[tokio::test]
async fn email_verified_counts_only_as_a_boolean_claim() {
    let (app, _jwks, _s) = app(&[]).await;
    for (sub, claim) in [
        ("str-verified", json!("true")),
        ("num-verified", json!(1)),
        ("absent", Value::Null),
    ] {
        let verified = (!claim.is_null()).then_some(claim);
        let token = support::user_token(sub, Some(&format!("{sub}@example.com")), verified);
        assert_eq!(try_token(&app, &token).await.0, 200);
        let user: Value = app
            .admin(Method::GET, &format!("/v1/users/{sub}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(user["user"]["email_verified"], false, "{sub}");
    }
    // No email claim: the user cannot be created.
    let token = support::user_token("no-email", None, None);
    assert_eq!(
        try_token(&app, &token).await,
        (422, Some("email_required".into()))
    );
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let (app, _jwks, _s) = app(&["rsa1"]).await;
    let secret = EncodingKey::from_secret(support::JWT_SECRET.as_bytes());
    let mut expired = claims("u1");
    expired["exp"] = json!(now() - 120);
    let mut wrong_aud = claims("u1");
    wrong_aud["aud"] = json!("anon");
    let mut no_sub = claims("u1");
    no_sub.as_object_mut().unwrap().remove("sub");
    let mut no_exp = claims("u1");
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut not_yet = claims("u1");
    not_yet["nbf"] = json!(now() + 600);

    let cases: Vec<(&str, String)> = vec![
        ("expired", sign(Algorithm::HS256, None, &secret, &expired)),
        (
            "wrong audience",
            sign(Algorithm::HS256, None, &secret, &wrong_aud),
        ),
        (
            "missing sub",
            sign(Algorithm::HS256, None, &secret, &no_sub),
        ),
        (
            "missing exp",
            sign(Algorithm::HS256, None, &secret, &no_exp),
        ),
        (
            "not yet valid",
            sign(Algorithm::HS256, None, &secret, &not_yet),
        ),
        (
            "wrong secret",
            sign(
                Algorithm::HS256,
                None,
                &EncodingKey::from_secret(b"another-secret-0123456789-abcdefghij"),
                &claims("u1"),
            ),
        ),
        ("alg none", unsigned(&claims("u1"))),
        (
            "HS256 signed with the RSA public key",
            sign(
                Algorithm::HS256,
                Some("rsa1"),
                &EncodingKey::from_secret(
                    &std::fs::read("tests/fixtures/jwt/rsa1.pub.pem").unwrap(),
                ),
                &claims("u1"),
            ),
        ),
        (
            "RS256 with an unknown kid",
            sign(Algorithm::RS256, Some("nope"), &rsa("rsa1"), &claims("u1")),
        ),
        (
            "RS256 without kid",
            sign(Algorithm::RS256, None, &rsa("rsa1"), &claims("u1")),
        ),
        (
            "RS256 signed by another key",
            sign(Algorithm::RS256, Some("rsa1"), &rsa("rsa2"), &claims("u1")),
        ),
        (
            "RS384 is not accepted",
            sign(Algorithm::RS384, Some("rsa1"), &rsa("rsa1"), &claims("u1")),
        ),
        ("garbage", "not.a.token".to_owned()),
        ("admin key as a user token", support::ADMIN_KEY.to_owned()),
    ];
    let mut tampered = support::user_token("u1", Some("u1@example.com"), None);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"sub": "admin", "aud": "authenticated", "exp": now() + 600}).to_string());
    let parts: Vec<&str> = tampered.split('.').collect();
    tampered = format!("{}.{}.{}", parts[0], payload, parts[2]);

    for (case, token) in cases
        .iter()
        .map(|(c, t)| (*c, t.clone()))
        .chain([("tampered payload", tampered)])
    {
        assert_eq!(try_token(&app, &token).await, unauthorized(), "{case}");
    }
    let missing = app
        .http
        .put(app.url("/api/user/profile"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    // Nothing was created by any of them.
    for sub in ["u1", "admin"] {
        let response = app
            .admin(Method::GET, &format!("/v1/users/{sub}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{sub}");
    }
}

fn unsigned(claims: &Value) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        engine.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
        engine.encode(claims.to_string())
    )
}

#[tokio::test]
async fn jwks_keys_verify_by_kid_and_rotation_is_picked_up() {
    let (app, jwks, _s) = app(&["rsa1", "ec1"]).await;
    let rs = sign(
        Algorithm::RS256,
        Some("rsa1"),
        &rsa("rsa1"),
        &claims("rs-user"),
    );
    assert_eq!(try_token(&app, &rs).await, (200, None));
    let es = sign(
        Algorithm::ES256,
        Some("ec1"),
        &ec("ec1"),
        &claims("es-user"),
    );
    assert_eq!(try_token(&app, &es).await, (200, None));
    // The key's algorithm is pinned: an ES256 key does not verify an RS256 header.
    let confused = sign(
        Algorithm::RS256,
        Some("ec1"),
        &rsa("rsa1"),
        &claims("es-user"),
    );
    assert_eq!(try_token(&app, &confused).await, unauthorized());

    // A token from a rotated-in key is refused until the JWKS publishes it, then accepted.
    let rotated = sign(
        Algorithm::RS256,
        Some("rsa2"),
        &rsa("rsa2"),
        &claims("rotated"),
    );
    assert_eq!(try_token(&app, &rotated).await, unauthorized());
    serve_jwks(&jwks, &["rsa2"]).await;
    assert_eq!(try_token(&app, &rotated).await, (200, None));
    // The retired key is gone once the set was refetched.
    assert_eq!(try_token(&app, &rs).await, unauthorized());
}

#[tokio::test]
async fn an_unreachable_jwks_is_503_not_401() {
    let store = support::sqlite_store().await;
    let mut config = support::test_config(DEAD_STRIPE);
    config.jwt.jwks_url = Some("http://127.0.0.1:9/jwks.json".into());
    let app = TestApp::spawn(store.store.clone(), &config).await;
    let token = sign(Algorithm::RS256, Some("rsa1"), &rsa("rsa1"), &claims("u"));
    assert_eq!(
        try_token(&app, &token).await,
        (503, Some("auth_unavailable".into()))
    );
}

#[tokio::test]
async fn issuer_is_checked_when_configured() {
    let store = support::sqlite_store().await;
    let mut config = support::test_config(DEAD_STRIPE);
    config.jwt = billsync::config::Config::load(&billsync::config::ConfigArgs {
        auth: billsync::config::settings::AuthSettings {
            jwt_secret: Some(support::JWT_SECRET.into()),
            jwt_issuer: Some("https://project.supabase.co/auth/v1".into()),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap()
    .jwt;
    let app = TestApp::spawn(store.store.clone(), &config).await;
    let secret = EncodingKey::from_secret(support::JWT_SECRET.as_bytes());
    let mut right = claims("iss-user");
    right["iss"] = json!("https://project.supabase.co/auth/v1");
    let mut wrong = claims("iss-user");
    wrong["iss"] = json!("https://evil.example.com");
    assert_eq!(
        try_token(&app, &sign(Algorithm::HS256, None, &secret, &right)).await,
        (200, None)
    );
    assert_eq!(
        try_token(&app, &sign(Algorithm::HS256, None, &secret, &wrong)).await,
        unauthorized()
    );
    assert_eq!(
        try_token(&app, &sign(Algorithm::HS256, None, &secret, &claims("x"))).await,
        unauthorized()
    );
}

#[tokio::test]
async fn user_routes_are_off_without_auth_configuration() {
    let store = support::sqlite_store().await;
    let mut config = support::test_config(DEAD_STRIPE);
    config.jwt.secret = None;
    let app = TestApp::spawn(store.store.clone(), &config).await;
    let token = support::user_token("u", Some("u@example.com"), None);
    assert_eq!(
        try_token(&app, &token).await,
        (503, Some("auth_disabled".into()))
    );
}

#[tokio::test]
async fn users_only_reach_their_own_data() {
    let (app, _jwks, _s) = app(&[]).await;
    app.put_user(
        "alice",
        json!({"email": "alice@example.com", "first_name": "Alice", "phone": "+14155550100"}),
    )
    .await;
    app.put_user(
        "bob",
        json!({"email": "bob@example.com", "first_name": "Bob"}),
    )
    .await;
    let bob = support::user_token("bob", Some("bob@example.com"), None);

    // Bob edits "his" profile: only his row changes, whatever he sends.
    let response = app
        .as_user(Method::PUT, "/api/user/profile", &bob)
        .json(&json!({"firstName": "Robert"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sneaky = app
        .as_user(Method::PUT, "/api/user/profile", &bob)
        .json(&json!({"firstName": "X", "id": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        sneaky.status(),
        422,
        "unknown fields are refused, not ignored"
    );
    let alice: Value = app
        .admin(Method::GET, "/v1/users/alice")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(alice["user"]["first_name"], "Alice");
    assert_eq!(alice["user"]["version"], 1);

    // Bob's export holds Bob only.
    let export = app
        .as_user(Method::GET, "/api/user/export-data", &bob)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        export.contains("Robert") && !export.contains("alice") && !export.contains("+14155550100")
    );

    // Bob's token does not open the admin API.
    let admin = app
        .as_user(Method::GET, "/v1/users/alice", &bob)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 401);

    // Bob deletes his account: Alice is untouched.
    let deleted = app
        .as_user(Method::DELETE, "/api/user/delete-account", &bob)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(
        app.admin(Method::GET, "/v1/users/bob")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        app.admin(Method::GET, "/v1/users/alice")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn profile_validation_names_the_field() {
    let (app, _jwks, _s) = app(&[]).await;
    let token = support::user_token("validate", Some("v@example.com"), None);
    for (body, field) in [
        (json!({"phone": "555-0100"}), "phone"),
        (json!({"firstName": "x".repeat(101)}), "firstName"),
        (json!({"lastName": "y".repeat(101)}), "lastName"),
    ] {
        let response = app
            .as_user(Method::PUT, "/api/user/profile", &token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_profile");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{error}"
        );
    }
}

/// An app whose JWKS endpoint is `url`, with a short fetch timeout.
async fn app_with_jwks(
    url: &str,
    tune: impl FnOnce(&mut billsync::config::Config),
) -> (TestApp, support::TestStore) {
    let store = support::sqlite_store().await;
    let mut config = support::test_config(DEAD_STRIPE);
    config.jwt.jwks_url = Some(url.to_owned());
    config.jwt.jwks_fetch_timeout = std::time::Duration::from_secs(1);
    tune(&mut config);
    (TestApp::spawn(store.store.clone(), &config).await, store)
}

/// A JWKS endpoint that accepts connections and never answers: the worst a peer can do.
/// Returns its URL and how many connections it accepted.
async fn hung_jwks() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket);
        }
    });
    (url, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_jwks_costs_a_request_one_fetch_timeout_at_most() {
    let (url, accepted) = hung_jwks().await;
    let (app, _s) = app_with_jwks(&url, |_| {}).await;
    let token = sign(
        Algorithm::RS256,
        Some("rsa1"),
        &rsa("rsa1"),
        &claims("hung"),
    );
    let started = std::time::Instant::now();
    // The rest of the service, probed throughout.
    let probing = {
        let http = app.http.clone();
        let (health, webhook) = (app.url("/healthz"), app.url("/api/webhooks/stripe"));
        tokio::spawn(async move {
            let mut slowest = std::time::Duration::ZERO;
            while started.elapsed() < std::time::Duration::from_millis(1_500) {
                for request in [http.get(&health), http.post(&webhook).body("{}")] {
                    let at = std::time::Instant::now();
                    let status = request.send().await.unwrap().status().as_u16();
                    assert!(status == 200 || status == 400, "{status}");
                    slowest = slowest.max(at.elapsed());
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            slowest
        })
    };
    let requests = (0..32).map(|_| {
        let (app, token) = (&app, token.clone());
        async move {
            let at = std::time::Instant::now();
            (try_token(app, &token).await, at.elapsed())
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    let slowest = answers.iter().map(|(_, took)| *took).max().unwrap();
    for (answer, _) in &answers {
        assert_eq!(answer, &(503, Some("auth_unavailable".into())));
    }
    let probe_slowest = probing.await.unwrap();
    eprintln!(
        "MEASURED hung JWKS: 32 user requests, slowest {slowest:?} (fetch timeout 1 s); \
         /healthz and webhook slowest {probe_slowest:?}; connections to the JWKS {}",
        accepted.load(std::sync::atomic::Ordering::SeqCst)
    );
    // Before: one fetch after another, 5 s each, the last request waiting 32 of them.
    assert!(
        slowest < std::time::Duration::from_millis(2_500),
        "slowest user request took {slowest:?}"
    );
    assert!(
        probe_slowest < std::time::Duration::from_secs(1),
        "the rest of the service waited {probe_slowest:?}"
    );
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one fetch, shared by every waiting request"
    );
    // The failure is remembered: the next requests answer at once, without a new fetch.
    let at = std::time::Instant::now();
    assert_eq!(
        try_token(&app, &token).await,
        (503, Some("auth_unavailable".into()))
    );
    assert!(at.elapsed() < std::time::Duration::from_millis(500));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn cached_keys_are_served_while_the_jwks_fails() {
    let jwks = MockServer::start().await;
    serve_jwks(&jwks, &["rsa1"]).await;
    let (app, _s) = app_with_jwks(&format!("{}/jwks.json", jwks.uri()), |c| {
        c.jwt.jwks_max_age = std::time::Duration::from_millis(50);
    })
    .await;
    let token = sign(
        Algorithm::RS256,
        Some("rsa1"),
        &rsa("rsa1"),
        &claims("stale"),
    );
    assert_eq!(try_token(&app, &token).await, (200, None));
    jwks.reset().await;
    Mock::given(path("/jwks.json"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&jwks)
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // Past max_age, the endpoint failing: the cached key still verifies, ten times over...
    for _ in 0..10 {
        assert_eq!(try_token(&app, &token).await, (200, None));
    }
    // ...and the failing endpoint was asked once, then left alone for its backoff.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let asked = jwks.received_requests().await.unwrap().len();
    assert_eq!(asked, 1, "fetches while failing");
}

#[tokio::test]
async fn the_jwks_fetch_follows_no_redirect_and_takes_no_huge_set() {
    let jwks = MockServer::start().await;
    let keys = json!({"keys": [jwk("rsa1")]});
    Mock::given(path("/moved.json"))
        .respond_with(ResponseTemplate::new(302).insert_header("location", "/jwks.json"))
        .mount(&jwks)
        .await;
    Mock::given(path("/jwks.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(keys.clone()))
        .mount(&jwks)
        .await;
    let padding = "x".repeat(300 * 1024);
    Mock::given(path("/huge.json"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"keys": [jwk("rsa1")], "padding": padding})),
        )
        .mount(&jwks)
        .await;
    let token = sign(
        Algorithm::RS256,
        Some("rsa1"),
        &rsa("rsa1"),
        &claims("moved"),
    );
    for refused in ["moved.json", "huge.json"] {
        let (app, _s) = app_with_jwks(&format!("{}/{refused}", jwks.uri()), |_| {}).await;
        assert_eq!(
            try_token(&app, &token).await,
            (503, Some("auth_unavailable".into())),
            "{refused}"
        );
    }
    let (app, _s) = app_with_jwks(&format!("{}/jwks.json", jwks.uri()), |_| {}).await;
    assert_eq!(try_token(&app, &token).await, (200, None));
}

#[tokio::test]
async fn an_attackers_kid_is_not_logged_verbatim() {
    let _ = support::captured_logs();
    let (app, _jwks, _s) = app(&["rsa1"]).await;
    let kid = "kid-\u{1b}[31m-INJECTED-1f3a9c";
    let token = sign(Algorithm::RS256, Some(kid), &rsa("rsa1"), &claims("kid"));
    assert_eq!(try_token(&app, &token).await, unauthorized());
    let logs = support::logs_text();
    assert!(
        logs.contains("user token rejected"),
        "the rejection is logged"
    );
    assert!(!logs.contains("INJECTED"), "the kid was logged verbatim");
}
