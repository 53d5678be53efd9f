//! `billsync users import FILE`: the command itself, on both stores: invalid rows reported by
//! line (and never by value), valid rows imported, a re-run that changes nothing and says so,
//! CSV, and an erased person left erased.

use std::process::{Command, Output};

use billsync::{domain::UserId, store::Store};

use crate::support::{Backend, TestStore};

fn billsync(database_url: &str) -> Command {
    let mut command = crate::cli::billsync();
    command.env("DATABASE_URL", database_url);
    command
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Self {
            ok: output.status.success(),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    }
}

fn import(t: &TestStore, file: &std::path::Path, extra: &[&str]) -> Run {
    billsync(&t.url)
        .args(["users", "import"])
        .arg(file)
        .args(extra)
        .output()
        .unwrap()
        .into()
}

/// The count the summary gives for `outcome`.
fn count(run: &Run, outcome: &str) -> u64 {
    run.stdout
        .lines()
        .find_map(|line| line.strip_prefix(outcome)?.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {outcome} in {}", run.stdout))
        .parse()
        .unwrap()
}

async fn user(store: &dyn Store, id: &str) -> Option<billsync::domain::User> {
    store.get_user(&UserId::parse(id).unwrap()).await.unwrap()
}

const PRIVATE_ADDRESS: &str = "not-an-address.private-person";

async fn import_reports_bad_rows_by_line_imports_the_rest_and_a_rerun_changes_nothing(
    backend: Backend,
) {
    let Some(t) = backend.store("users_import_cli").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.jsonl");
    std::fs::write(
        &file,
        format!(
            r#"{{"id": "u1", "email": "ada@example.com", "email_verified": true, "first_name": "Ada"}}
{{"id": "u2", "email": "Grace@Example.com", "phone": "+14155550123"}}
{{"id": "u3", "email": "{PRIVATE_ADDRESS}"}}

{{"id": "u4", "email": "u4@example.com", "plan": "pro"}}
{{"id": "u5", "email": "u5@example.com", "last_name": null}}
not json at all
{{"id": "u6", "email": "u6@example.com"}}
"#
        ),
    )
    .unwrap();

    let first = import(&t, &file, &[]);
    assert!(!first.ok, "a file with invalid rows exits non-zero");
    assert!(
        first.stderr.contains("line 3: invalid_email:"),
        "{}",
        first.stderr
    );
    assert!(
        first
            .stderr
            .contains("line 5: invalid_request: unknown field `plan`"),
        "{}",
        first.stderr
    );
    assert!(
        first.stderr.contains("line 7: invalid_json:"),
        "{}",
        first.stderr
    );
    assert!(first.stderr.contains("3 invalid rows"), "{}", first.stderr);
    assert!(
        !first.stderr.contains(PRIVATE_ADDRESS),
        "a row's values are never repeated"
    );
    assert_eq!(
        [
            count(&first, "created"),
            count(&first, "updated"),
            count(&first, "invalid")
        ],
        [4, 0, 3]
    );
    let store = t.store.as_ref();
    let ada = user(store, "u1").await.unwrap();
    assert!(ada.email_verified);
    assert_eq!(ada.first_name.unwrap().as_str(), "Ada");
    let grace = user(store, "u2").await.unwrap();
    assert_eq!(grace.email.as_str(), "grace@example.com");
    assert_eq!(grace.phone.unwrap().as_str(), "+14155550123");
    assert!(user(store, "u3").await.is_none());
    assert!(user(store, "u6").await.is_some());

    let again = import(&t, &file, &[]);
    assert_eq!(
        [
            count(&again, "created"),
            count(&again, "updated"),
            count(&again, "unchanged")
        ],
        [0, 0, 4]
    );
    assert!(again.stdout.contains("nothing changed"), "{}", again.stdout);
    assert_eq!(user(store, "u1").await.unwrap().version, 1);

    // A CSV export of the same users, one renamed, one unverified: two updates.
    let csv = dir.path().join("users.csv");
    std::fs::write(
        &csv,
        "id,email,email_verified,first_name,last_name,phone\n\
         u1,ada@example.com,t,Augusta Ada,,\n\
         u2,Grace@Example.com,f,,,+14155550123\n\
         u5,u5@example.com,false,,,\n\
         u6,u6@example.com,true,,,\n",
    )
    .unwrap();
    let from_csv = import(&t, &csv, &[]);
    assert!(from_csv.ok, "{}", from_csv.stderr);
    assert_eq!(
        [
            count(&from_csv, "updated"),
            count(&from_csv, "unchanged"),
            count(&from_csv, "invalid")
        ],
        [2, 2, 0]
    );
    assert!(!from_csv.stdout.contains("nothing changed"));
    let ada = user(store, "u1").await.unwrap();
    assert_eq!(
        (ada.first_name.unwrap().as_str(), ada.version),
        ("Augusta Ada", 2)
    );
    assert!(user(store, "u6").await.unwrap().email_verified);

    // Standard input, with the format named.
    let piped = billsync(&t.url)
        .args(["users", "import", "-", "--format", "jsonl"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    let piped = Run::from(piped);
    assert_eq!(count(&piped, "unchanged"), 2);
    assert_eq!(count(&piped, "updated"), 2, "the JSONL's values back");
}

async fn an_erased_person_in_an_old_export_stays_erased(backend: Backend) {
    let Some(t) = backend.store("users_import_erased").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("old-export.jsonl");
    std::fs::write(
        &file,
        "{\"id\": \"leaver\", \"email\": \"leaver@example.com\"}\n\
         {\"id\": \"stayer\", \"email\": \"stayer@example.com\"}\n",
    )
    .unwrap();
    assert!(import(&t, &file, &[]).ok);
    // The leaver erases their account (no customer: no Stripe call is made).
    let erased = billsync(&t.url)
        .env("STRIPE_SECRET_KEY", "sk_test_x")
        .env("BILLSYNC_STRIPE_API_BASE", "http://127.0.0.1:9")
        .args(["erase", "--user", "leaver"])
        .output()
        .unwrap();
    let erased = Run::from(erased);
    assert_eq!(erased.stdout.trim(), "erased", "{}", erased.stderr);

    let replayed = import(&t, &file, &[]);
    assert!(replayed.ok, "{}", replayed.stderr);
    assert_eq!(
        [
            count(&replayed, "erased"),
            count(&replayed, "unchanged"),
            count(&replayed, "created")
        ],
        [1, 1, 0]
    );
    assert!(user(t.store.as_ref(), "leaver").await.is_none());
}

async fn a_file_the_command_cannot_read_changes_nothing(backend: Backend) {
    let Some(t) = backend.store("users_import_unreadable").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unknown_format = dir.path().join("users.txt");
    std::fs::write(
        &unknown_format,
        "{\"id\": \"x\", \"email\": \"x@example.com\"}\n",
    )
    .unwrap();
    let refused = import(&t, &unknown_format, &[]);
    assert!(!refused.ok);
    assert!(refused.stderr.contains("--format"), "{}", refused.stderr);

    let bad_header = dir.path().join("users.csv");
    std::fs::write(&bad_header, "id,email,plan\nx,x@example.com,pro\n").unwrap();
    let refused = import(&t, &bad_header, &[]);
    assert!(!refused.ok);
    assert!(refused.stderr.contains("`plan`"), "{}", refused.stderr);

    let missing = import(&t, &dir.path().join("absent.jsonl"), &[]);
    assert!(!missing.ok);
    assert!(missing.stderr.contains("cannot open"), "{}", missing.stderr);
    assert!(user(t.store.as_ref(), "x").await.is_none());
}

on_every_store!(
    import_reports_bad_rows_by_line_imports_the_rest_and_a_rerun_changes_nothing,
    an_erased_person_in_an_old_export_stays_erased,
    a_file_the_command_cannot_read_changes_nothing,
);

/// An import batch that deadlocks with another writer (here a transaction that holds one of
/// its users and then wants another it holds) is the one Postgres aborts, having waited the
/// longest; the batch is tried again and every user is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_batch_that_deadlocks_is_tried_again() {
    use sqlx::Connection;
    let Some(t) = Backend::Postgres.store("users_import_deadlock").await else {
        return;
    };
    let store = t.store.clone();
    for id in ["a-first", "b-second"] {
        store
            .upsert_user(
                &billsync::domain::UserUpsert::parse(
                    UserId::parse(id).unwrap(),
                    &format!("{id}@example.com"),
                    false,
                    None,
                    None,
                    None,
                )
                .unwrap(),
            )
            .await
            .unwrap();
    }
    let mut other = sqlx::PgConnection::connect(&t.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT 1 FROM users WHERE id = 'b-second' FOR UPDATE")
        .execute(&mut other)
        .await
        .unwrap();
    let importing = {
        let store = store.clone();
        tokio::spawn(async move {
            let tombstones = billsync::gdpr::Tombstones::new(Some(billsync::config::Secret::new(
                "a-pepper-of-at-least-32-characters!",
            )));
            let rows = ["a-first", "b-second"]
                .map(|id| {
                    billsync::domain::UserUpsert::parse(
                        UserId::parse(id).unwrap(),
                        &format!("{id}@example.com"),
                        true,
                        Some("Renamed"),
                        None,
                        None,
                    )
                    .unwrap()
                })
                .to_vec();
            billsync::users_import::import(store.as_ref(), &tombstones, rows).await
        })
    };
    // The batch holds a-first and waits for b-second; now this transaction wants a-first.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let crossing = sqlx::query("SELECT 1 FROM users WHERE id = 'a-first' FOR UPDATE")
        .execute(&mut other)
        .await;
    assert!(
        crossing.is_ok(),
        "the batch, not this transaction, was aborted"
    );
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    let outcomes = importing.await.unwrap().expect("the batch is tried again");
    assert_eq!(outcomes.len(), 2);
    for id in ["a-first", "b-second"] {
        let user = store
            .get_user(&UserId::parse(id).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(user.first_name.unwrap().as_str(), "Renamed");
    }
}
