//! The migrations, embedded in the binary (`migrations/postgres`, `migrations/sqlite`).

use sqlx::migrate::{Migration, MigrationType, Migrator};

fn embedded_migrator(files: &[(i64, &'static str, &'static str)]) -> Migrator {
    Migrator {
        migrations: files
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into(),
                    false,
                )
            })
            .collect::<Vec<_>>()
            .into(),
        ..Migrator::DEFAULT
    }
}

pub(crate) fn postgres_migrator() -> Migrator {
    embedded_migrator(&[
        (
            1,
            "init",
            include_str!("../../migrations/postgres/0001_init.sql"),
        ),
        (
            2,
            "link change notify",
            include_str!("../../migrations/postgres/0002_link_change_notify.sql"),
        ),
        (
            3,
            "due events index",
            include_str!("../../migrations/postgres/0003_due_events_index.sql"),
        ),
        (
            4,
            "event queue",
            include_str!("../../migrations/postgres/0004_event_queue.sql"),
        ),
        (
            5,
            "push stamp",
            include_str!("../../migrations/postgres/0005_push_stamp.sql"),
        ),
        (
            6,
            "subscriptions and deleted customers",
            include_str!("../../migrations/postgres/0006_subscriptions_and_deleted_customers.sql"),
        ),
        (
            7,
            "outbox fencing",
            include_str!("../../migrations/postgres/0007_outbox_fencing.sql"),
        ),
        (
            8,
            "events by customer",
            include_str!("../../migrations/postgres/0008_events_by_customer.sql"),
        ),
        (
            9,
            "erasure tombstones",
            include_str!("../../migrations/postgres/0009_erasure_tombstones.sql"),
        ),
        (
            10,
            "email as given",
            include_str!("../../migrations/postgres/0010_email_as_given.sql"),
        ),
    ])
}

pub(crate) fn sqlite_migrator() -> Migrator {
    embedded_migrator(&[
        (
            1,
            "init",
            include_str!("../../migrations/sqlite/0001_init.sql"),
        ),
        (
            2,
            "due events index",
            include_str!("../../migrations/sqlite/0002_due_events_index.sql"),
        ),
        (
            3,
            "event queue",
            include_str!("../../migrations/sqlite/0003_event_queue.sql"),
        ),
        (
            4,
            "push stamp",
            include_str!("../../migrations/sqlite/0004_push_stamp.sql"),
        ),
        (
            5,
            "subscriptions and deleted customers",
            include_str!("../../migrations/sqlite/0005_subscriptions_and_deleted_customers.sql"),
        ),
        (
            6,
            "outbox fencing",
            include_str!("../../migrations/sqlite/0006_outbox_fencing.sql"),
        ),
        (
            7,
            "events by customer",
            include_str!("../../migrations/sqlite/0007_events_by_customer.sql"),
        ),
        (
            8,
            "erasure tombstones",
            include_str!("../../migrations/sqlite/0008_erasure_tombstones.sql"),
        ),
        (
            9,
            "email as given",
            include_str!("../../migrations/sqlite/0009_email_as_given.sql"),
        ),
    ])
}
