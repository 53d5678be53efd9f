//! Hostile strings — SQL, JSON, header and form metacharacters — in ids, names and emails
//! round-trip unchanged through the API, the database and the Stripe form encoding, and never
//! change a query: no other row is touched, every table survives.

use crate::support;

use reqwest::Method;
use serde_json::{json, Value};
use support::{eventually, Backend, TestApp};
use wiremock::{matchers::method, Mock, MockServer, ResponseTemplate};

const HOSTILE_IDS: [&str; 8] = [
    "'; DROP TABLE users; --",
    "Robert'); DELETE FROM customer_links; --",
    "a\"b\\c",
    "{\"$ne\": null}",
    "x%27y%00z",
    // (a bare ".." cannot be a URL path segment at all: URLs resolve it)
    "../../etc/passwd",
    "id with spaces/and/slashes?x=1&y=2#frag",
    "ünïcødé\u{202e}override",
];

const HOSTILE_NAMES: [&str; 4] = [
    "O'Brien \"Bobby\"; --",
    "Tables', (SELECT 1)); /*",
    "a&name=evil&metadata[userId]=victim",
    "<script>alert(1)</script>\\",
];

async fn app(backend: Backend, test: &str) -> Option<(TestApp, MockServer, support::TestStore)> {
    let store = backend.store(test).await?;
    let stripe = MockServer::start().await;
    let app = TestApp::spawn(store.store.clone(), &support::test_config(&stripe.uri())).await;
    Some((app, stripe, store))
}

async fn hostile_strings_round_trip_and_change_nothing_else(backend: Backend) {
    let Some((app, stripe, _store)) = app(backend, "hostile_strings_round_trip").await else {
        return;
    };
    // A bystander whose row must never change.
    let bystander = app
        .put_user(
            "bystander",
            json!({"email": "bystander@example.com", "first_name": "Calm"}),
        )
        .await;

    for (i, id) in HOSTILE_IDS.iter().enumerate() {
        let name = HOSTILE_NAMES[i % HOSTILE_NAMES.len()];
        let email = format!("o'brien+{i}@example.com");
        let written = app
            .put_user(
                id,
                json!({"email": email, "first_name": name, "last_name": id}),
            )
            .await;
        assert_eq!(written["user"]["id"], *id);
        let read: Value = app
            .admin_json(&format!("/v1/users/{}", support::encode(id)))
            .await;
        assert_eq!(read["user"]["id"], *id, "{id}");
        assert_eq!(read["user"]["first_name"], name);
        assert_eq!(read["user"]["last_name"], *id);
        assert_eq!(read["user"]["email"], email);
    }
    let again: Value = app.admin_json("/v1/users/bystander").await;
    assert_eq!(
        again["user"], bystander["user"],
        "the bystander is untouched"
    );
    // Every table is still there and holds exactly what was written.
    let events: Value = app.admin_json("/v1/events").await;
    assert!(events["events"].is_array());
    let missing = app
        .admin(
            Method::GET,
            &format!("/v1/users/{}", support::encode("' OR '1'='1")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404, "a quote in an id is only an id");

    // A signed-in user whose token subject is hostile.
    let sub = HOSTILE_IDS[1];
    let token = support::user_token(sub, Some("sub@example.com"), Some(json!(true)));
    // Header metacharacters (CR LF) are control characters: refused, naming the field.
    let refused = app
        .as_user(Method::PUT, "/api/user/profile", &token)
        .json(&json!({"lastName": "x\r\nSet-Cookie: a=b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_profile");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("lastName"));
    let response = app
        .as_user(Method::PUT, "/api/user/profile", &token)
        .json(&json!({"firstName": HOSTILE_NAMES[2], "lastName": HOSTILE_NAMES[0]}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["first_name"], HOSTILE_NAMES[2]);
    assert_eq!(body["data"]["last_name"], HOSTILE_NAMES[0]);
    assert_eq!(body["data"]["id"], sub);

    // The Stripe form: a name full of form metacharacters is one field, not three.
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "cus_inject", "object": "customer"})),
        )
        .mount(&stripe)
        .await;
    support::link_in_store(app.state.store.as_ref(), HOSTILE_IDS[0], "cus_inject").await;
    app.put_user(
        HOSTILE_IDS[0],
        json!({"email": "pushed@example.com", "first_name": HOSTILE_NAMES[2], "last_name": "Z"}),
    )
    .await;
    let form: Vec<(String, String)> = eventually(10, "the push reached Stripe", || async {
        let requests = stripe.received_requests().await.unwrap();
        let request = requests
            .iter()
            .find(|r| r.url.path() == "/v1/customers/cus_inject")?;
        Some(serde_urlencoded::from_bytes(&request.body).unwrap())
    })
    .await;
    let field = |key: &str| {
        form.iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(field("name"), [format!("{} Z", HOSTILE_NAMES[2])]);
    assert!(
        field("metadata[userId]").iter().all(|v| *v != "victim"),
        "no field smuggled in: {form:?}"
    );
}

on_every_store!(hostile_strings_round_trip_and_change_nothing_else);
