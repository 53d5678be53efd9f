//! The embedded store: one file, WAL mode, a busy timeout so concurrent writers wait instead
//! of failing, and `BEGIN IMMEDIATE` for every multi-statement write (see
//! `dialect::begin_write`). One serving process per file (`leases`); batches are a statement
//! per row (`batches`), cheap in-process.

use std::{
    fs::File,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    SqlitePool,
};

use super::{link_cache::LinkCache, StoreError, StoreOptions, StoreResult};
use crate::domain::OutboxJob;

mod batches;
// The shared statements, compiled for this backend (the other mounts them too).
#[allow(clippy::duplicate_mod)]
#[path = "../common/mod.rs"]
mod common;
mod dialect;
mod leases;

type Backend = SqliteStore;

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    push_debounce: Duration,
    /// What a user's plan is, for `plan.changed` when their subscriptions change.
    plans: Arc<crate::plans::Plans>,
    /// Never switched on: no other process (the CLI) could tell this one about its changes,
    /// and reads are in-process and cheap. The shared link code goes through it all the same.
    links: Arc<LinkCache>,
    /// The database file (`None` in memory).
    file: Option<PathBuf>,
    /// The serving lock, once `claim_serving` took it; released when the process ends.
    serving: Arc<std::sync::Mutex<Option<File>>>,
}

/// The database file the options name, unless the database lives in memory.
fn on_disk(options: &SqliteConnectOptions) -> Option<PathBuf> {
    let file = options.get_filename();
    let name = file.to_string_lossy();
    (!name.is_empty() && name != ":memory:" && !name.starts_with("file::memory:"))
        .then(|| file.to_path_buf())
}

/// Creates the database file readable by its owner only (it holds people's contact details)
/// if it does not exist yet; SQLite gives its `-wal` and `-shm` files the same mode.
fn create_private(file: &Path) -> StoreResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
    {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(StoreError::Unavailable(sqlx::Error::Io(err))),
    }
}

impl SqliteStore {
    pub async fn connect(url: &str, options: &StoreOptions) -> StoreResult<Self> {
        let connect = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before it returns, so a 2xx (an acknowledged webhook,
            // a saved edit, a finished erasure) survives a power cut. NORMAL in WAL mode may
            // roll back the last commits; group commit amortises the extra fsync.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true)
            // 1 MiB of page cache per connection (SQLite's default is 2 MiB): a pool of 16
            // otherwise holds 32 MiB, most of it copies of the same hot pages.
            .pragma("cache_size", "-1024");
        let file = on_disk(&connect);
        if let Some(file) = &file {
            create_private(file)?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(connect)
            .await?;
        Ok(Self {
            pool,
            push_debounce: options.push_debounce,
            plans: options.plans.clone(),
            links: Arc::new(LinkCache::new(Duration::ZERO, 0)),
            file,
            serving: Arc::new(std::sync::Mutex::new(None)),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A pending job waits while any job of its user is in flight (the unique index on
    /// in-flight rows enforces it), and only the user's first due job is taken. `$1` the
    /// limit, `$2` the lease.
    const CLAIM_DUE_JOBS: &'static str = "UPDATE outbox
         SET state = 'in_flight', attempts = attempts + 1, locked_until = {later $2},
             claim_token = {new_token}, updated_at = {now}
         WHERE id IN (
            SELECT o.id FROM outbox o
            WHERE (o.state = 'in_flight' AND o.locked_until < {now})
               OR (o.state = 'pending' AND o.next_attempt_at <= {now}
                   AND NOT EXISTS (SELECT 1 FROM outbox b
                                   WHERE b.user_id = o.user_id AND b.state = 'in_flight')
                   AND NOT EXISTS (SELECT 1 FROM outbox b
                                   WHERE b.user_id = o.user_id AND b.state = 'pending'
                                     AND b.next_attempt_at <= {now}
                                     AND (b.next_attempt_at, b.id) < (o.next_attempt_at, o.id)))
            ORDER BY o.next_attempt_at, o.id
            LIMIT $1)
         RETURNING {job_columns}";

    /// Runs a claiming statement; one that a concurrent in-flight job of the same user
    /// refuses (the unique index) claims nothing.
    async fn claim(&self, claim: common::jobs::JobClaim<'_>) -> StoreResult<Vec<OutboxJob>> {
        match claim.fetch_all(&self.pool).await {
            Err(err) if super::is_unique_violation(&err) => Ok(Vec::new()),
            rows => rows?.into_iter().map(common::rows::job_from_row).collect(),
        }
    }

    /// A claim holds nothing here but its row.
    async fn claim_ended(&self, _id: i64, _token: &str) {}
}
