//! Real stores: SQLite temp files, and a fresh Postgres database per test when
//! `BILLSYNC_TEST_POSTGRES_URL` is set. A suite whose environment is missing is skipped out
//! loud, never silently.

use std::{io::Write, sync::Arc};

use billsync::store::{self, Store, StoreOptions};

pub const POSTGRES_ENV: &str = "BILLSYNC_TEST_POSTGRES_URL";

/// Says on the real stderr (not the captured test output) that a test did not run and why.
/// With `BILLSYNC_REQUIRE_SUITES=1` (CI) a skip is a failure: the suite must run.
pub fn skip(test: &str, reason: &str) {
    if std::env::var("BILLSYNC_REQUIRE_SUITES").is_ok_and(|v| v == "1") {
        panic!("{test} cannot run: {reason} (BILLSYNC_REQUIRE_SUITES=1)");
    }
    // One write of the whole line, so scripts/test.sh can count it among the test output.
    let line = format!("SKIPPED {test}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

pub async fn sqlite_store() -> TestStore {
    sqlite_store_with(&StoreOptions::new(8)).await
}

pub async fn sqlite_store_with(options: &StoreOptions) -> TestStore {
    let t = unmigrated_sqlite_store_with(options).await;
    t.store.migrate().await.expect("migrate sqlite");
    t
}

pub async fn unmigrated_sqlite_store_with(options: &StoreOptions) -> TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("billsync.db").display());
    let store = store::connect_with(&url, options)
        .await
        .expect("open sqlite");
    TestStore {
        store,
        url,
        _dir: Some(dir),
    }
}

pub async fn postgres_store_with(test: &str, options: &StoreOptions) -> Option<TestStore> {
    let t = unmigrated_postgres_store_with(test, options).await?;
    t.store.migrate().await.expect("migrate postgres");
    Some(t)
}

pub async fn unmigrated_postgres_store_with(
    test: &str,
    options: &StoreOptions,
) -> Option<TestStore> {
    let Ok(admin_url) = std::env::var(POSTGRES_ENV) else {
        skip(
            test,
            &format!(
                "{POSTGRES_ENV} is not set (e.g. postgres://postgres@127.0.0.1:5432/postgres)"
            ),
        );
        return None;
    };
    let name = format!("billsync_test_{}", uuid::Uuid::new_v4().simple());
    let admin = admin_pool(&admin_url).await;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    let url = database_url(&admin_url, &name);
    let store = store::connect_with(&url, options)
        .await
        .expect("open postgres");
    Some(TestStore {
        store,
        url,
        _dir: None,
    })
}

async fn admin_pool(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("connect to postgres")
}

/// `url` with its database name replaced.
pub fn database_url(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let (server, _) = base.rsplit_once('/').expect("postgres url has a path");
    match query {
        Some(q) => format!("{server}/{database}?{q}"),
        None => format!("{server}/{database}"),
    }
}
