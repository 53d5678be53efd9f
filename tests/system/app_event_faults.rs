//! App events against a hostile receiver and a crash: billsync SIGKILLed while deliveries are
//! in flight, and a receiver that fails, hangs and goes away. Every event reaches it in the
//! end, verified by the official library, each user's in order.

use std::{collections::HashSet, time::Duration};

use billsync::domain::{Email, PersonName, UserId};
use billsync::store::UserUpsert;
use serde_json::{json, Value};

use crate::support::{
    self,
    process::{free_port, start_with, wait_ready},
    receiver::{body, delivering_to, of_key, Receiver, APP_WEBHOOK_SECRET},
    Backend, TestApp,
};

const USERS: usize = 10;
const CHANGES: usize = 3;

fn upsert(user: &str, name: &str) -> UserUpsert {
    UserUpsert {
        id: UserId::parse(user).unwrap(),
        email: Email::parse(&format!("{user}@example.com")).unwrap(),
        email_verified: true,
        first_name: PersonName::parse_optional(Some(name), "first_name").unwrap(),
        last_name: None,
        phone: None,
    }
}

async fn a_kill_mid_delivery_loses_no_app_event(backend: Backend) {
    let test = "a_kill_mid_delivery_loses_no_app_event";
    let Some(receiver) = Receiver::start(test) else {
        return;
    };
    let Some(t) = backend.store(test).await else {
        return;
    };
    let users: Vec<String> = (0..USERS).map(|i| format!("crashed{i}")).collect();
    for user in &users {
        t.store.upsert_user(&upsert(user, "C0")).await.unwrap();
    }
    receiver.set_mode("hang").await;
    let settings = [
        ("BILLSYNC_APP_WEBHOOK_URL", receiver.url()),
        ("BILLSYNC_APP_WEBHOOK_SECRET", APP_WEBHOOK_SECRET.to_owned()),
        ("BILLSYNC_APP_WEBHOOK_TIMEOUT_MS", "1000".to_owned()),
        ("BILLSYNC_APP_WEBHOOK_BACKOFF_BASE_MS", "100".to_owned()),
        ("BILLSYNC_APP_WEBHOOK_BACKOFF_MAX_SECS", "1".to_owned()),
        ("BILLSYNC_APP_EVENTS_POLL_MS", "20".to_owned()),
    ];
    let port = free_port();
    let mut server = start_with(&t.url, port, &settings);
    wait_ready(port).await;
    for round in 1..=CHANGES {
        for user in &users {
            t.store
                .upsert_user(&upsert(user, &format!("C{round}")))
                .await
                .unwrap();
        }
    }
    // Every user's first event is out and unanswered when the process dies.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let held: HashSet<String> = receiver
            .received()
            .await
            .iter()
            .filter_map(|d| d["key"].as_str().map(str::to_owned))
            .collect();
        if held.len() == USERS {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "deliveries never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill();
    receiver.set_mode("ok").await;
    let mut server = start_with(&t.url, port, &settings);
    wait_ready(port).await;

    let delivered = receiver
        .wait_for(Duration::from_secs(40), |d| {
            users.iter().all(|u| of_key(d, u).len() == CHANGES)
        })
        .await;
    for user in &users {
        let names: Vec<Value> = of_key(&delivered, user)
            .iter()
            .map(|d| body(d)["data"]["user"]["first_name"].clone())
            .collect();
        let expected: Vec<Value> = (1..=CHANGES)
            .map(|r| Value::from(format!("C{r}")))
            .collect();
        assert_eq!(names, expected, "{user}'s events, in order");
    }
    assert!(receiver
        .received()
        .await
        .iter()
        .all(|d| d["verified"] == true));
    server.kill();
}

/// A receiver that answers 500s, hangs past the timeout, and is down for 10 s: every event is
/// delivered in the end, each user's in order, none lost; and a tampered or replayed delivery
/// fails the library's verification.
async fn a_failing_receiver_loses_nothing_and_keeps_order(backend: Backend) {
    let test = "a_failing_receiver_loses_nothing_and_keeps_order";
    let Some(mut receiver) = Receiver::start(test) else {
        return;
    };
    let Some(t) = backend.store(test).await else {
        return;
    };
    let config = delivering_to(support::test_config("http://127.0.0.1:9"), &receiver, None);
    let app = TestApp::spawn(t.store.clone(), &config).await;
    let users: Vec<String> = (0..5)
        .map(|i| support::unique(&format!("faulty{i}")))
        .collect();
    for user in &users {
        app.put_user(user, json!({"email": format!("{user}@example.com")}))
            .await;
    }
    let mut round = 0;
    let mut change = || {
        round += 1;
        let round = round;
        let app = &app;
        let users = &users;
        async move {
            for user in users {
                app.put_user(
                    user,
                    json!({"email": format!("{user}@example.com"), "first_name": format!("N{round}")}),
                )
                .await;
            }
        }
    };
    receiver.set_mode("fail").await;
    change().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    receiver.set_mode("hang").await;
    change().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    receiver.stop().await;
    change().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    change().await;
    receiver.restart();
    receiver.set_mode("ok").await;
    change().await;

    let delivered = receiver
        .wait_for(Duration::from_secs(30), |d| {
            users.iter().all(|u| of_key(d, u).len() == 5)
        })
        .await;
    for user in &users {
        let names: Vec<Value> = of_key(&delivered, user)
            .iter()
            .map(|d| body(d)["data"]["user"]["first_name"].clone())
            .collect();
        assert_eq!(
            names,
            ["N1", "N2", "N3", "N4", "N5"].map(Value::from),
            "{user}'s order"
        );
    }
    let all = receiver.received().await;
    assert!(
        all.iter().any(|d| d["mode"] == "fail"),
        "the 500s were tried"
    );
    assert!(
        all.iter().any(|d| d["mode"] == "hang"),
        "the hangs were tried"
    );
    assert!(all.iter().all(|d| d["verified"] == true));
    let failed: Value = app
        .admin(reqwest::Method::GET, "/v1/app-events?state=failed")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(failed["events"], json!([]));

    // The same delivery, replayed 10 minutes later or tampered with, does not verify.
    let sample = &delivered[0];
    let headers = &sample["headers"];
    let raw = sample["body"].as_str().unwrap();
    assert_eq!(
        receiver.verify(raw, headers, 0).await["verified"],
        true,
        "as it came"
    );
    let replayed = receiver.verify(raw, headers, 600).await;
    assert_eq!(replayed["verified"], false);
    let tampered = raw.replacen("N", "M", 1);
    let tampered = receiver.verify(&tampered, headers, 0).await;
    assert_eq!(tampered["verified"], false);
    assert!(
        tampered["error"].as_str().unwrap().contains("signature"),
        "{tampered}"
    );
}

/// A receiver that fails every other delivery: an event that will be retried holds back the
/// rest of its user's claimed run, so the app never takes a later event before an earlier one.
async fn a_retried_event_holds_back_the_rest_of_its_run(backend: Backend) {
    let test = "a_retried_event_holds_back_the_rest_of_its_run";
    let Some(receiver) = Receiver::start(test) else {
        return;
    };
    let Some(t) = backend.store(test).await else {
        return;
    };
    let config = delivering_to(support::test_config("http://127.0.0.1:9"), &receiver, None);
    let app = TestApp::spawn(t.store.clone(), &config).await;
    let user = support::unique("alternating");
    let email = format!("{user}@example.com");
    app.put_user(&user, json!({ "email": email })).await;
    // The first change fails while the others commit behind it: one run of six to claim.
    receiver.set_mode("fail").await;
    for n in 1..=6 {
        app.put_user(
            &user,
            json!({"email": email, "first_name": format!("N{n}")}),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    receiver.set_mode("alternate").await;
    let delivered = receiver
        .wait_for(Duration::from_secs(30), |d| of_key(d, &user).len() == 6)
        .await;
    let names: Vec<Value> = of_key(&delivered, &user)
        .iter()
        .map(|d| body(d)["data"]["user"]["first_name"].clone())
        .collect();
    assert_eq!(
        names,
        ["N1", "N2", "N3", "N4", "N5", "N6"].map(Value::from),
        "the order the app took them in"
    );
    let all = receiver.received().await;
    let refused = all
        .iter()
        .filter(|d| d["key"] == user.as_str() && d["mode"] == "fail")
        .count();
    assert!(
        refused >= 6,
        "every event was refused once at least: {refused}"
    );
}

on_every_store!(
    a_kill_mid_delivery_loses_no_app_event,
    a_failing_receiver_loses_nothing_and_keeps_order,
    a_retried_event_holds_back_the_rest_of_its_run,
);
