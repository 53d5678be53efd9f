//! The migrations, embedded in the binary (`migrations/postgres`, `migrations/sqlite`).

use sqlx::migrate::{Migration, MigrationType, Migrator};

/// The files of a folder under `migrations/`, in order, embedded.
macro_rules! embedded {
    ($dir:literal: $($file:literal),* $(,)?) => {
        embedded_migrator(&[$(
            ($file, include_str!(concat!("../../migrations/", $dir, "/", $file))),
        )*])
    };
}

/// Each file is named `NNNN_what_it_does.sql`: its version, then its description.
fn embedded_migrator(files: &[(&'static str, &'static str)]) -> Migrator {
    Migrator {
        migrations: files
            .iter()
            .map(|&(file, sql)| {
                let (version, name) = file.split_once('_').expect("NNNN_name.sql");
                Migration::new(
                    version.parse().expect("a numbered migration"),
                    name.trim_end_matches(".sql").replace('_', " ").into(),
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
    embedded!("postgres":
        "0001_init.sql",
        "0002_link_change_notify.sql",
        "0003_due_events_index.sql",
        "0004_event_queue.sql",
        "0005_push_stamp.sql",
        "0006_subscriptions_and_deleted_customers.sql",
        "0007_outbox_fencing.sql",
        "0008_events_by_customer.sql",
        "0009_erasure_tombstones.sql",
        "0010_email_as_given.sql",
        "0011_app_events.sql",
        "0012_app_event_heads.sql",
        "0013_plans_announced.sql",
        "0014_app_events_fillfactor.sql",
        "0015_reconcile_runs.sql",
    )
}

pub(crate) fn sqlite_migrator() -> Migrator {
    embedded!("sqlite":
        "0001_init.sql",
        "0002_due_events_index.sql",
        "0003_event_queue.sql",
        "0004_push_stamp.sql",
        "0005_subscriptions_and_deleted_customers.sql",
        "0006_outbox_fencing.sql",
        "0007_events_by_customer.sql",
        "0008_erasure_tombstones.sql",
        "0009_email_as_given.sql",
        "0010_app_events.sql",
        "0011_app_event_heads.sql",
        "0012_plans_announced.sql",
        "0013_reconcile_runs.sql",
    )
}
