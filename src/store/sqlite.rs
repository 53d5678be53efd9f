use std::{
    fs::File,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    Row, Sqlite, SqlitePool, Transaction,
};
use time::OffsetDateTime;

use super::{
    clip_error, event_from_parts, is_unique_violation, job_from_parts, link_from_row, now, opt_str,
    parse_json, pushed_profile, user_from_row, AuditEntry, CustomerLink, CustomerUpdate, Erased,
    EventOutcome, EventState, EventToApply, JobOutcome, JobState, LinkOutcome, NewEvent, OutboxJob,
    PushedProfile, ResolveClaim, Store, StoreError, StoreResult, StoredEvent, SubscriptionMirror,
    UpdateContext, UsageRecord, User, UserUpsert, DUE_WINDOW_PER_CUSTOMER,
};
use crate::domain::{LinkSource, StripeCustomerId, UserId};

/// Ids as a JSON array, for `IN (SELECT value FROM json_each(?))`: SQLite has no array binds.
fn ids_json(ids: &[String]) -> String {
    serde_json::Value::from(ids).to_string()
}

const USER_COLUMNS: &str = "id, email, email_verified, first_name, last_name, phone, version, \
     created_at, updated_at, email_as_given";
const LINK_COLUMNS: &str = "user_id, stripe_customer_id, livemode, linked_via, linked_at";
const USER_COLUMNS_QUALIFIED: &str = "users.id, users.email, users.email_verified, \
     users.first_name, users.last_name, users.phone, users.version, users.created_at, \
     users.updated_at, users.email_as_given";

type SqliteUserRow = (
    String,
    String,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
    i64,
    Option<String>,
);
type SqliteLinkRow = (String, String, bool, String, i64);
const EVENT_COLUMNS: &str = "id, type, created, livemode, stripe_customer_id, state, attempts, \
     last_error, received_at";
type SqliteEventRow = (
    String,
    String,
    i64,
    bool,
    Option<String>,
    String,
    i32,
    Option<String>,
    i64,
);

fn event(row: SqliteEventRow) -> StoreResult<StoredEvent> {
    let (id, kind, created, livemode, customer, state, attempts, last_error, received_at) = row;
    event_from_parts(
        (
            id, kind, created, livemode, customer, state, attempts, last_error,
        ),
        from_ms(received_at)?,
    )
}

type SqliteJobRow = (
    i64,
    String,
    String,
    String,
    String,
    i32,
    Option<String>,
    Option<String>,
    i64,
    i64,
    i64,
);

/// True when the proposed profile (`excluded`) differs from the stored one.
const USER_CHANGED: &str = "users.email IS NOT excluded.email \
     OR users.email_verified IS NOT excluded.email_verified \
     OR users.first_name IS NOT excluded.first_name OR users.last_name IS NOT excluded.last_name \
     OR users.phone IS NOT excluded.phone";
const JOB_COLUMNS: &str = "id, kind, user_id, payload, state, attempts, last_error, \
     claim_token, next_attempt_at, created_at, updated_at";
/// A new claim's token: 128 random bits.
const NEW_TOKEN: &str = "lower(hex(randomblob(16)))";
/// Another job that makes this one redundant: a pending push for the same user, or an
/// active erasure.
const SUPERSEDED: &str = "EXISTS (SELECT 1 FROM outbox other WHERE other.user_id = outbox.user_id \
     AND other.kind = outbox.kind AND other.id <> outbox.id \
     AND (other.state = 'pending' OR (other.kind = 'erase' AND other.state = 'in_flight')))";

fn job(row: SqliteJobRow) -> StoreResult<OutboxJob> {
    let (id, kind, user_id, payload, state, attempts, last_error, token, next, created, updated) =
        row;
    job_from_parts(
        (
            id, kind, user_id, payload, state, attempts, last_error, token,
        ),
        from_ms(next)?,
        from_ms(created)?,
        from_ms(updated)?,
    )
}

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Writes the user's profile if its version is still `expected` and something differs;
/// the new row, or `None`.
async fn update_user_in(
    tx: &mut Transaction<'_, Sqlite>,
    input: &UserUpsert,
    expected: i64,
    now: i64,
) -> StoreResult<Option<User>> {
    let row: Option<SqliteUserRow> = sqlx::query_as(&format!(
        "UPDATE users SET email = ?2, email_verified = ?3, first_name = ?4, last_name = ?5,
                phone = ?6, version = version + 1, updated_at = ?8, email_as_given = ?9
         WHERE id = ?1 AND version = ?7
           AND (email IS NOT ?2 OR email_verified IS NOT ?3 OR first_name IS NOT ?4
                OR last_name IS NOT ?5 OR phone IS NOT ?6)
         RETURNING {USER_COLUMNS}"
    ))
    .bind(input.id.as_str())
    .bind(input.email.as_str())
    .bind(input.email_verified)
    .bind(opt_str(&input.first_name))
    .bind(opt_str(&input.last_name))
    .bind(opt_str(&input.phone))
    .bind(expected)
    .bind(now)
    .bind(input.email.as_given())
    .fetch_optional(&mut **tx)
    .await?;
    row.map(user).transpose()
}

/// Records a profile as what Stripe holds for the user's customer.
async fn record_pushed_on(
    connection: &mut sqlx::SqliteConnection,
    user: &UserId,
    pushed: &PushedProfile,
    version: i64,
    stamp: Option<i64>,
    now: i64,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE customer_links SET pushed_email = ?2, pushed_name = ?3, pushed_phone = ?4,
                pushed_version = ?5, pushed_at = ?6, pushed_stamp = coalesce(?7, pushed_stamp)
         WHERE user_id = ?1",
    )
    .bind(user.as_str())
    .bind(&pushed.email)
    .bind(&pushed.name)
    .bind(&pushed.phone)
    .bind(version)
    .bind(now)
    .bind(stamp)
    .execute(connection)
    .await?;
    Ok(())
}

async fn raise_watermark_on(
    connection: &mut sqlx::SqliteConnection,
    customer: &str,
    created: i64,
    event_id: &str,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE customer_links SET event_watermark = ?2, event_watermark_id = ?3
         WHERE stripe_customer_id = ?1
           AND (event_watermark IS NULL OR event_watermark <= ?2)",
    )
    .bind(customer)
    .bind(created)
    .bind(event_id)
    .execute(connection)
    .await?;
    Ok(())
}

/// Finishes applied events: deletes their queue rows; the event row is rewritten only for an
/// event that failed before, to keep its attempt count.
async fn finish_applied_in(
    tx: &mut Transaction<'_, Sqlite>,
    ids: &[String],
    now: i64,
) -> StoreResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE stripe_events
         SET state = 'applied', last_error = NULL, applied_at = ?2,
             attempts = (SELECT q.attempts FROM stripe_event_queue q
                         WHERE q.event_id = stripe_events.id)
         WHERE id IN (SELECT event_id FROM stripe_event_queue
                      WHERE event_id IN (SELECT value FROM json_each(?1))
                        AND attempts > 0)",
    )
    .bind(ids_json(ids))
    .bind(now)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "DELETE FROM stripe_event_queue WHERE event_id IN (SELECT value FROM json_each(?1))",
    )
    .bind(ids_json(ids))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn get_user_in(tx: &mut Transaction<'_, Sqlite>, id: &UserId) -> StoreResult<Option<User>> {
    let row: Option<SqliteUserRow> =
        sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"))
            .bind(id.as_str())
            .fetch_optional(&mut **tx)
            .await?;
    row.map(user).transpose()
}

fn to_ms(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_ms(ms: i64) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

fn user(row: SqliteUserRow) -> StoreResult<User> {
    let (id, email, verified, first, last, phone, version, created, updated, as_given) = row;
    user_from_row((
        id,
        email,
        verified,
        first,
        last,
        phone,
        version,
        from_ms(created)?,
        from_ms(updated)?,
        as_given,
    ))
}

fn link(row: SqliteLinkRow) -> StoreResult<CustomerLink> {
    let (user_id, customer_id, livemode, via, linked_at) = row;
    link_from_row((user_id, customer_id, livemode, via, from_ms(linked_at)?))
}

/// The embedded store: one file, WAL mode, a busy timeout so concurrent writers wait instead
/// of failing. Multi-statement writes begin with `BEGIN IMMEDIATE`, so no transaction ever
/// upgrades a read lock (which SQLite answers with SQLITE_BUSY at once, busy timeout or not).
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    push_debounce: Duration,
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

/// The lock file beside the database that a serving process holds.
fn serve_lock_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

impl SqliteStore {
    /// No link cache here: reads are in-process and cheap, and a second process (the CLI)
    /// could not tell this one about its changes.
    pub async fn connect(url: &str, options: &super::StoreOptions) -> StoreResult<Self> {
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
            file,
            serving: Arc::new(std::sync::Mutex::new(None)),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn enqueue_push(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        user: &UserId,
        now: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO outbox (kind, user_id, payload, state, attempts, next_attempt_at,
                                 created_at, updated_at)
             VALUES ('push_profile', ?1, '{}', 'pending', 0, ?2, ?3, ?3)
             ON CONFLICT (user_id) WHERE kind = 'push_profile' AND state = 'pending' DO NOTHING",
        )
        .bind(user.as_str())
        .bind(now + ms(self.push_debounce))
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> StoreResult<()> {
        super::sqlite_migrator()
            .run(&self.pool)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(inner) => inner.into(),
                other => StoreError::Other(sqlx::Error::Migrate(Box::new(other))),
            })
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn users_page(&self, after: Option<&UserId>, limit: u32) -> StoreResult<Vec<User>> {
        let rows: Vec<SqliteUserRow> = sqlx::query_as(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE (?1 IS NULL OR id > ?1) ORDER BY id LIMIT ?2"
        ))
        .bind(after.map(UserId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(user).collect()
    }

    async fn links_page(
        &self,
        after: Option<&UserId>,
        limit: u32,
    ) -> StoreResult<Vec<CustomerLink>> {
        let rows: Vec<SqliteLinkRow> = sqlx::query_as(&format!(
            "SELECT {LINK_COLUMNS} FROM customer_links WHERE (?1 IS NULL OR user_id > ?1)
             ORDER BY user_id LIMIT ?2"
        ))
        .bind(after.map(UserId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(link).collect()
    }

    async fn queue_profile_push(&self, user: &UserId) -> StoreResult<()> {
        let now = to_ms(now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        self.enqueue_push(&mut tx, user, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn portal_config(&self, name: &str) -> StoreResult<Option<super::PortalConfigRecord>> {
        let row: Option<(String, String, String, i64)> = sqlx::query_as(
            "SELECT name, stripe_configuration_id, spec_hash, applied_at
             FROM portal_configurations WHERE name = ?1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(name, id, hash, at)| {
            Ok(super::PortalConfigRecord {
                name,
                stripe_configuration_id: id,
                spec_hash: hash,
                applied_at: from_ms(at)?,
            })
        })
        .transpose()
    }

    async fn save_portal_config(&self, record: &super::PortalConfigRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO portal_configurations (name, stripe_configuration_id, spec_hash, applied_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET stripe_configuration_id = excluded.stripe_configuration_id,
                 spec_hash = excluded.spec_hash, applied_at = excluded.applied_at",
        )
        .bind(&record.name)
        .bind(&record.stripe_configuration_id)
        .bind(&record.spec_hash)
        .bind(to_ms(record.applied_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn queue_stats(&self) -> StoreResult<super::QueueStats> {
        let row: (i64, Option<i64>, i64, i64, Option<i64>, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight')),
                    (SELECT min(created_at) FROM outbox WHERE state = 'pending'),
                    (SELECT count(*) FROM outbox WHERE state = 'failed'),
                    (SELECT count(*) FROM stripe_event_queue WHERE state = 'pending'),
                    (SELECT min(received_at) FROM stripe_event_queue WHERE state = 'pending'),
                    (SELECT count(*) FROM stripe_event_queue WHERE state = 'failed')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(super::QueueStats {
            outbox_depth: row.0,
            outbox_oldest_pending: row.1.map(from_ms).transpose()?,
            outbox_failed: row.2,
            events_pending: row.3,
            events_oldest_pending: row.4.map(from_ms).transpose()?,
            events_failed: row.5,
        })
    }

    async fn upsert_user(&self, input: &UserUpsert) -> StoreResult<User> {
        let now = to_ms(now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let written: Option<SqliteUserRow> = sqlx::query_as(&format!(
            "INSERT INTO users (id, email, email_verified, first_name, last_name, phone, version, \
                                created_at, updated_at, email_as_given)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7, ?7, ?8)
             ON CONFLICT (id) DO UPDATE SET
                email = excluded.email, email_as_given = excluded.email_as_given,
                email_verified = excluded.email_verified,
                first_name = excluded.first_name, last_name = excluded.last_name,
                phone = excluded.phone, version = users.version + 1,
                updated_at = excluded.updated_at
             WHERE {USER_CHANGED}
             RETURNING {USER_COLUMNS}"
        ))
        .bind(input.id.as_str())
        .bind(input.email.as_str())
        .bind(input.email_verified)
        .bind(opt_str(&input.first_name))
        .bind(opt_str(&input.last_name))
        .bind(opt_str(&input.phone))
        .bind(now)
        .bind(input.email.as_given())
        .fetch_optional(&mut *tx)
        .await?;
        let saved = match written {
            Some(row) => {
                let saved = user(row)?;
                if saved.version > 1 {
                    self.enqueue_push(&mut tx, &saved.id, now).await?;
                }
                saved
            }
            None => get_user_in(&mut tx, &input.id)
                .await?
                .ok_or_else(|| StoreError::Corrupt("user vanished during upsert".into()))?,
        };
        tx.commit().await?;
        Ok(saved)
    }

    async fn update_user_if_version(
        &self,
        input: &UserUpsert,
        expected: i64,
    ) -> StoreResult<Option<User>> {
        let now = to_ms(now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let written = update_user_in(&mut tx, input, expected, now).await?;
        let outcome = match written {
            Some(saved) => {
                self.enqueue_push(&mut tx, &saved.id, now).await?;
                Some(saved)
            }
            None => get_user_in(&mut tx, &input.id)
                .await?
                .filter(|current| current.version == expected),
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn get_user(&self, id: &UserId) -> StoreResult<Option<User>> {
        let row: Option<SqliteUserRow> =
            sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"))
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        row.map(user).transpose()
    }

    async fn get_link(&self, user_id: &UserId) -> StoreResult<Option<CustomerLink>> {
        let row: Option<SqliteLinkRow> = sqlx::query_as(&format!(
            "SELECT {LINK_COLUMNS} FROM customer_links WHERE user_id = ?1"
        ))
        .bind(user_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(link).transpose()
    }

    async fn remove_link(&self, user_id: &UserId) -> StoreResult<Option<CustomerLink>> {
        let row: Option<SqliteLinkRow> = sqlx::query_as(&format!(
            "DELETE FROM customer_links WHERE user_id = ?1 RETURNING {LINK_COLUMNS}"
        ))
        .bind(user_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(link).transpose()
    }

    async fn get_link_by_customer(
        &self,
        customer: &StripeCustomerId,
    ) -> StoreResult<Option<CustomerLink>> {
        let row: Option<SqliteLinkRow> = sqlx::query_as(&format!(
            "SELECT {LINK_COLUMNS} FROM customer_links WHERE stripe_customer_id = ?1"
        ))
        .bind(customer.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(link).transpose()
    }

    async fn insert_link(
        &self,
        user_id: &UserId,
        customer: &StripeCustomerId,
        livemode: bool,
        via: LinkSource,
    ) -> StoreResult<LinkOutcome> {
        let inserted: Option<SqliteLinkRow> = sqlx::query_as(&format!(
            "INSERT INTO customer_links (user_id, stripe_customer_id, livemode, linked_via, linked_at)
             SELECT ?1, ?2, ?3, ?4, ?5
             WHERE EXISTS (SELECT 1 FROM users WHERE id = ?1)
               AND NOT EXISTS (SELECT 1 FROM deleted_customers WHERE stripe_customer_id = ?2)
             ON CONFLICT DO NOTHING
             RETURNING {LINK_COLUMNS}"
        ))
        .bind(user_id.as_str())
        .bind(customer.as_str())
        .bind(livemode)
        .bind(via.as_str())
        .bind(to_ms(now()))
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = inserted {
            return Ok(LinkOutcome::Linked(link(row)?));
        }
        super::explain_link_conflict(self, user_id, customer).await
    }

    async fn record_deleted_customer(&self, customer: &str, created: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO deleted_customers (stripe_customer_id, deleted_created, recorded_at)
             VALUES (?1, ?2, ?3)
             ON CONFLICT (stripe_customer_id) DO UPDATE
             SET deleted_created = MAX(deleted_created, excluded.deleted_created)",
        )
        .bind(customer)
        .bind(created)
        .bind(to_ms(now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn record_push(&self, user_id: &UserId, pushed: &PushedProfile) -> StoreResult<()> {
        let mut connection = self.pool.acquire().await?;
        record_pushed_on(
            &mut connection,
            user_id,
            pushed,
            pushed.version,
            Some(pushed.version),
            to_ms(now()),
        )
        .await
    }

    async fn last_push(&self, user_id: &UserId) -> StoreResult<Option<PushedProfile>> {
        let row: Option<(Option<String>, Option<String>, Option<String>, Option<i64>)> =
            sqlx::query_as(
                "SELECT pushed_email, pushed_name, pushed_phone, pushed_version
                 FROM customer_links WHERE user_id = ?1",
            )
            .bind(user_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .and_then(|(email, name, phone, version)| pushed_profile(email, name, phone, version)))
    }

    async fn claim_jobs(&self, limit: u32, lease: Duration) -> StoreResult<Vec<OutboxJob>> {
        let now = to_ms(now());
        // A pending job waits while any job of its user is in flight (the unique index on
        // in-flight rows enforces it), and only the user's first due job is taken.
        let rows: Result<Vec<SqliteJobRow>, _> = sqlx::query_as(&format!(
            "UPDATE outbox SET state = 'in_flight', attempts = attempts + 1, locked_until = ?2,
                    claim_token = {NEW_TOKEN}, updated_at = ?1
             WHERE id IN (
                SELECT o.id FROM outbox o
                WHERE (o.state = 'in_flight' AND o.locked_until < ?1)
                   OR (o.state = 'pending' AND o.next_attempt_at <= ?1
                       AND NOT EXISTS (SELECT 1 FROM outbox b
                                       WHERE b.user_id = o.user_id AND b.state = 'in_flight')
                       AND NOT EXISTS (SELECT 1 FROM outbox b
                                       WHERE b.user_id = o.user_id AND b.state = 'pending'
                                         AND b.next_attempt_at <= ?1
                                         AND (b.next_attempt_at, b.id)
                                             < (o.next_attempt_at, o.id)))
                ORDER BY o.next_attempt_at, o.id
                LIMIT ?3)
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(now)
        .bind(now + ms(lease))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await;
        let rows = match rows {
            Err(err) if is_unique_violation(&err) => return Ok(Vec::new()),
            other => other?,
        };
        let mut jobs = rows.into_iter().map(job).collect::<StoreResult<Vec<_>>>()?;
        jobs.sort_by_key(|j| (j.next_attempt_at, j.id));
        Ok(jobs)
    }

    async fn claim_job(&self, id: i64, lease: Duration) -> StoreResult<Option<OutboxJob>> {
        let now = to_ms(now());
        let row: Result<Option<SqliteJobRow>, _> = sqlx::query_as(&format!(
            "UPDATE outbox SET state = 'in_flight', attempts = attempts + 1, locked_until = ?3,
                    claim_token = {NEW_TOKEN}, updated_at = ?2
             WHERE id = ?1 AND state = 'pending'
               AND NOT EXISTS (SELECT 1 FROM outbox b
                               WHERE b.user_id = outbox.user_id AND b.state = 'in_flight')
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(id)
        .bind(now)
        .bind(now + ms(lease))
        .fetch_optional(&self.pool)
        .await;
        match row {
            Err(err) if is_unique_violation(&err) => Ok(None),
            other => other?.map(job).transpose(),
        }
    }

    async fn finish_job(&self, job: &OutboxJob, outcome: &JobOutcome) -> StoreResult<bool> {
        let Some(token) = job.claim_token.as_deref() else {
            return Ok(false);
        };
        let now = to_ms(now());
        let query = match outcome {
            JobOutcome::Done => sqlx::query(
                "UPDATE outbox SET state = 'done', locked_until = NULL, last_error = NULL,
                        updated_at = ?2
                 WHERE id = ?1 AND claim_token = ?3 AND state = 'in_flight'",
            )
            .bind(job.id)
            .bind(now),
            JobOutcome::Failed { error } => sqlx::query(
                "UPDATE outbox SET state = 'failed', locked_until = NULL, last_error = ?3,
                        updated_at = ?2
                 WHERE id = ?1 AND claim_token = ?4 AND state = 'in_flight'",
            )
            .bind(job.id)
            .bind(now)
            .bind(clip_error(error)),
            JobOutcome::Retry { delay, error } => sqlx::query(&RETRY_SQL)
                .bind(job.id)
                .bind(now)
                .bind(clip_error(error))
                .bind(now + ms(*delay)),
        };
        Ok(query.bind(token).execute(&self.pool).await?.rows_affected() > 0)
    }

    async fn save_job_payload(
        &self,
        job: &OutboxJob,
        payload: &serde_json::Value,
    ) -> StoreResult<bool> {
        let Some(token) = job.claim_token.as_deref() else {
            return Ok(false);
        };
        Ok(sqlx::query(
            "UPDATE outbox SET payload = ?2, updated_at = ?3
             WHERE id = ?1 AND claim_token = ?4 AND state = 'in_flight'",
        )
        .bind(job.id)
        .bind(payload.to_string())
        .bind(to_ms(now()))
        .bind(token)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    async fn get_job(&self, id: i64) -> StoreResult<Option<OutboxJob>> {
        let row: Option<SqliteJobRow> =
            sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM outbox WHERE id = ?1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(job).transpose()
    }

    async fn list_jobs(&self, state: Option<JobState>, limit: u32) -> StoreResult<Vec<OutboxJob>> {
        let rows: Vec<SqliteJobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM outbox WHERE (?1 IS NULL OR state = ?1)
             ORDER BY id DESC LIMIT ?2"
        ))
        .bind(state.map(JobState::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(job).collect()
    }

    async fn retry_job(&self, id: i64) -> StoreResult<Option<OutboxJob>> {
        let row: Option<SqliteJobRow> = sqlx::query_as(&format!(
            "UPDATE outbox SET state = CASE WHEN {SUPERSEDED} THEN 'done' ELSE 'pending' END,
                    attempts = 0, next_attempt_at = ?2, locked_until = NULL,
                    last_error = NULL, updated_at = ?2
             WHERE id = ?1 AND state = 'failed'
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(id)
        .bind(to_ms(now()))
        .fetch_optional(&self.pool)
        .await?;
        row.map(job).transpose()
    }

    async fn enqueue_erase(
        &self,
        user_id: &UserId,
        payload: &serde_json::Value,
    ) -> StoreResult<OutboxJob> {
        let row: Option<SqliteJobRow> = sqlx::query_as(&format!(
            "INSERT INTO outbox (kind, user_id, payload, state, attempts, next_attempt_at,
                                 created_at, updated_at)
             VALUES ('erase', ?1, ?2, 'pending', 0, ?3 + 30000, ?3, ?3)
             ON CONFLICT (user_id) WHERE kind = 'erase' AND state IN ('pending', 'in_flight')
             DO NOTHING
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(user_id.as_str())
        .bind(payload.to_string())
        .bind(to_ms(now()))
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => job(row),
            None => self
                .active_erase(user_id)
                .await?
                .ok_or_else(|| StoreError::Corrupt("erase job vanished".into())),
        }
    }

    async fn active_erase(&self, user_id: &UserId) -> StoreResult<Option<OutboxJob>> {
        let row: Option<SqliteJobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM outbox
             WHERE user_id = ?1 AND kind = 'erase' AND state IN ('pending', 'in_flight')"
        ))
        .bind(user_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(job).transpose()
    }

    async fn erase_user(
        &self,
        user_id: &UserId,
        handled_customer: Option<&str>,
        subject_hash: &str,
        audit_detail: &serde_json::Value,
    ) -> StoreResult<Erased> {
        let now = to_ms(now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // The row lock keeps a link from being made until this transaction ends (it then
        // finds no user); a link made before it is seen here.
        let linked: Option<Option<String>> = sqlx::query_scalar(
            "SELECT l.stripe_customer_id FROM users u
             LEFT JOIN customer_links l ON l.user_id = u.id
             WHERE u.id = ?1",
        )
        .bind(user_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(customer) = linked
            .flatten()
            .filter(|c| Some(c.as_str()) != handled_customer)
        {
            tx.rollback().await?;
            return Ok(Erased::Relinked(customer));
        }
        // The customer's stored webhook payloads (email, name, phone, address) go too.
        if let Some(customer) = handled_customer {
            for table in ["stripe_event_queue", "stripe_events"] {
                sqlx::query(&format!(
                    "DELETE FROM {table} WHERE stripe_customer_id = ?1"
                ))
                .bind(customer)
                .execute(&mut *tx)
                .await?;
            }
        }
        let existed = sqlx::query("DELETE FROM users WHERE id = ?1")
            .bind(user_id.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        sqlx::query(
            "DELETE FROM outbox WHERE user_id = ?1 AND kind = 'push_profile'
                                  AND state IN ('pending', 'failed')",
        )
        .bind(user_id.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE outbox SET user_id = 'erased:' || ?2, last_error = NULL WHERE user_id = ?1",
        )
        .bind(user_id.as_str())
        .bind(subject_hash)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, subject_hash, detail)
             VALUES (?1, 'billsync', 'account_erased', ?2, ?3)",
        )
        .bind(now)
        .bind(subject_hash)
        .bind(audit_detail.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Erased::Done(existed))
    }

    async fn append_audit(
        &self,
        actor: &str,
        action: &str,
        subject_hash: Option<&str>,
        detail: &serde_json::Value,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, subject_hash, detail)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(to_ms(now()))
        .bind(actor)
        .bind(action)
        .bind(subject_hash)
        .bind(detail.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn insert_usage_record(
        &self,
        user_id: &UserId,
        metric: &str,
        quantity: i64,
        recorded_at: OffsetDateTime,
    ) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO usage_records (user_id, metric, quantity, recorded_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
        )
        .bind(user_id.as_str())
        .bind(metric)
        .bind(quantity)
        .bind(to_ms(recorded_at))
        .bind(to_ms(now()))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn setting_or_init(&self, name: &str, value: &str) -> StoreResult<String> {
        sqlx::query("INSERT INTO billsync_settings (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM billsync_settings WHERE name = ?1")
                .bind(name)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn record_tombstone(&self, subject: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO erasure_tombstones (subject, erased_at) VALUES (?1, ?2)
             ON CONFLICT (subject) DO UPDATE SET erased_at = excluded.erased_at",
        )
        .bind(subject)
        .bind(to_ms(now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn tombstone(&self, subject: &str) -> StoreResult<Option<OffsetDateTime>> {
        let at: Option<i64> =
            sqlx::query_scalar("SELECT erased_at FROM erasure_tombstones WHERE subject = ?1")
                .bind(subject)
                .fetch_optional(&self.pool)
                .await?;
        at.map(from_ms).transpose()
    }

    async fn customer_events_page(
        &self,
        customer: &str,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT id, payload FROM stripe_events
             WHERE stripe_customer_id = ?1 AND (?2 IS NULL OR id > ?2)
             ORDER BY id LIMIT ?3",
        )
        .bind(customer)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn user_jobs(&self, user: &UserId) -> StoreResult<Vec<OutboxJob>> {
        let rows: Vec<SqliteJobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM outbox WHERE user_id = ?1 ORDER BY id"
        ))
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(job).collect()
    }

    async fn audit_for_subject(&self, subject_hash: &str) -> StoreResult<Vec<AuditEntry>> {
        let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
            "SELECT at, actor, action, detail FROM audit_log WHERE subject_hash = ?1 ORDER BY id",
        )
        .bind(subject_hash)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(at, actor, action, detail)| {
                Ok(AuditEntry {
                    at: from_ms(at)?,
                    actor,
                    action,
                    detail: parse_json(&detail)?,
                })
            })
            .collect()
    }

    async fn usage_records_page(
        &self,
        user_id: &UserId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<UsageRecord>> {
        let rows: Vec<(i64, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT id, metric, quantity, recorded_at, created_at FROM usage_records
             WHERE user_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )
        .bind(user_id.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, metric, quantity, recorded_at, created_at)| {
                Ok(UsageRecord {
                    id,
                    metric,
                    quantity,
                    recorded_at: from_ms(recorded_at)?,
                    created_at: from_ms(created_at)?,
                })
            })
            .collect()
    }

    async fn list_subscriptions(&self, user: &UserId) -> StoreResult<Vec<SubscriptionMirror>> {
        type Row = (
            String,
            Option<String>,
            String,
            String,
            Option<String>,
            bool,
            Option<i64>,
            i64,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            String,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, user_id, stripe_customer_id, status, price_id, cancel_at_period_end,
                    current_period_end, updated_at, cancel_at, canceled_at, ended_at, items
             FROM subscriptions WHERE user_id = ?1 ORDER BY id",
        )
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let (id, user_id, customer_id, status, price_id, cancel, period_end, updated_at) =
                    (row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7);
                Ok(SubscriptionMirror {
                    id,
                    user_id: user_id
                        .map(|u| UserId::parse(&u))
                        .transpose()
                        .map_err(|e| StoreError::Corrupt(e.message))?,
                    customer_id,
                    status,
                    price_id,
                    cancel_at_period_end: cancel,
                    current_period_end: period_end.map(from_ms).transpose()?,
                    updated_at: from_ms(updated_at)?,
                    cancel_at: row.8.map(from_ms).transpose()?,
                    canceled_at: row.9.map(from_ms).transpose()?,
                    ended_at: row.10.map(from_ms).transpose()?,
                    items: super::items_from_json(&row.11)?,
                })
            })
            .collect()
    }

    async fn insert_events(&self, events: &[NewEvent]) -> StoreResult<Vec<bool>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let now = to_ms(now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut inserted = std::collections::HashSet::new();
        for event in events {
            let seq: Option<i64> = sqlx::query_scalar(
                "INSERT INTO stripe_events (id, type, created, livemode, stripe_customer_id,
                                            payload, received_at, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (id) DO NOTHING
                 RETURNING seq",
            )
            .bind(&event.id)
            .bind(&event.kind)
            .bind(event.created)
            .bind(event.livemode)
            .bind(&event.customer_id)
            .bind(&event.payload)
            .bind(now)
            .bind(event.state.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            let Some(seq) = seq else { continue };
            if event.state == EventState::Pending {
                sqlx::query(
                    "INSERT INTO stripe_event_queue (event_id, stripe_customer_id, created, seq,
                                                     received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .bind(&event.id)
                .bind(&event.customer_id)
                .bind(event.created)
                .bind(seq)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            inserted.insert(event.id.clone());
        }
        tx.commit().await?;
        Ok(super::first_inserted(events, &inserted))
    }

    async fn list_events(
        &self,
        state: Option<EventState>,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>> {
        // Waiting events are found through the (small) queue, the others by walking the
        // inbox newest first.
        let source = match state {
            Some(EventState::Pending | EventState::Failed) => {
                "(SELECT s.* FROM stripe_event_queue q
                  JOIN stripe_event_states s ON s.id = q.event_id WHERE q.state = ?1)"
            }
            _ => "stripe_event_states",
        };
        let rows: Vec<SqliteEventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM {source} WHERE (?1 IS NULL OR state = ?1)
             ORDER BY seq DESC LIMIT ?2"
        ))
        .bind(state.map(EventState::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(event).collect()
    }

    async fn replay_event(&self, id: &str) -> StoreResult<Option<StoredEvent>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // An event without a customer has nothing to apply it to: it stays as it is.
        let reset = sqlx::query(
            "UPDATE stripe_events SET state = 'pending', attempts = 0, last_error = NULL,
                                      next_attempt_at = NULL, applied_at = NULL
             WHERE id = ?1 AND stripe_customer_id IS NOT NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if reset.rows_affected() > 0 {
            sqlx::query(
                "INSERT INTO stripe_event_queue (event_id, stripe_customer_id, created, seq,
                                                 received_at)
                 SELECT id, stripe_customer_id, created, seq, received_at FROM stripe_events
                 WHERE id = ?1
                 ON CONFLICT (event_id) DO UPDATE
                    SET state = 'pending', attempts = 0, next_attempt_at = NULL,
                        last_error = NULL",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        let row: Option<SqliteEventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM stripe_event_states WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        if reset.rows_affected() == 0 && row.is_some() {
            tracing::info!(event_id = %id, "replay: the event names no customer; nothing to apply");
        }
        row.map(event).transpose()
    }

    async fn replay_failed_events(&self) -> StoreResult<u64> {
        Ok(sqlx::query(
            "UPDATE stripe_event_queue SET state = 'pending', attempts = 0, next_attempt_at = NULL,
                    last_error = NULL WHERE state = 'failed'",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn prune_events(&self, cutoff: OffsetDateTime) -> StoreResult<u64> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // Events parked as failed go after the retention too.
        sqlx::query(
            "DELETE FROM stripe_event_queue
             WHERE state = 'failed' AND next_attempt_at IS NULL AND received_at < ?1",
        )
        .bind(to_ms(cutoff))
        .execute(&mut *tx)
        .await?;
        let pruned = sqlx::query(
            "DELETE FROM stripe_events WHERE received_at < ?1
                AND NOT EXISTS (SELECT 1 FROM stripe_event_queue q
                                WHERE q.event_id = stripe_events.id)",
        )
        .bind(to_ms(cutoff))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(pruned)
    }

    async fn claim_serving(&self) -> StoreResult<()> {
        if let Some(file) = &self.file {
            let path = serve_lock_path(file);
            let lock = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?
            };
            match lock.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::InUse(format!(
                        "another billsync process is serving {} (it holds {}); \
                         SQLite takes one serving process per file: use Postgres for several",
                        file.display(),
                        path.display()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(StoreError::Unavailable(sqlx::Error::Io(e)))
                }
            }
            *self.serving.lock().expect("serving lock mutex") = Some(lock);
        }
        // The only serving process: leases left by one that died are void.
        sqlx::query("DELETE FROM event_customer_leases")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn due_event_customers(&self, limit: u32) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "WITH due AS (
                 SELECT * FROM (SELECT stripe_customer_id, seq FROM stripe_event_queue
                                WHERE state = 'pending' ORDER BY seq LIMIT ?3)
                 UNION ALL
                 SELECT * FROM (SELECT stripe_customer_id, seq FROM stripe_event_queue
                                WHERE state = 'failed' AND next_attempt_at <= ?1
                                ORDER BY seq LIMIT ?3)
             )
             SELECT stripe_customer_id FROM due
             WHERE NOT EXISTS (
                 SELECT 1 FROM stripe_event_queue waiting
                 WHERE waiting.stripe_customer_id = due.stripe_customer_id
                   AND waiting.state = 'failed' AND waiting.next_attempt_at > ?1)
             GROUP BY stripe_customer_id
             ORDER BY min(seq)
             LIMIT ?2",
        )
        .bind(to_ms(now()))
        .bind(i64::from(limit))
        .bind(i64::from(limit) * DUE_WINDOW_PER_CUSTOMER)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn try_lease_customers(
        &self,
        customers: &[String],
        holder: &str,
        lease: Duration,
    ) -> StoreResult<Vec<String>> {
        let now = to_ms(now());
        // `WHERE true` lets SQLite parse the upsert clause after a SELECT.
        Ok(sqlx::query_scalar(
            "INSERT INTO event_customer_leases (stripe_customer_id, holder, lease_until)
             SELECT DISTINCT value, ?2, ?3 FROM json_each(?1) WHERE true
             ON CONFLICT (stripe_customer_id) DO UPDATE
                SET holder = excluded.holder, lease_until = excluded.lease_until
                WHERE event_customer_leases.lease_until <= ?4
             RETURNING stripe_customer_id",
        )
        .bind(ids_json(customers))
        .bind(holder)
        .bind(now + ms(lease))
        .bind(now)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn release_customers(&self, customers: &[String], holder: &str) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM event_customer_leases
             WHERE stripe_customer_id IN (SELECT value FROM json_each(?1)) AND holder = ?2",
        )
        .bind(ids_json(customers))
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn customers_events(
        &self,
        customers: &[String],
        limit: u32,
    ) -> StoreResult<Vec<(String, Vec<EventToApply>)>> {
        let now = to_ms(now());
        let mut connection = self.pool.acquire().await?;
        let mut found = Vec::new();
        for customer in customers {
            // A `customer.updated` followed by another due one is superseded by it: its
            // payload stays in the database.
            let rows = sqlx::query(
                "SELECT id, type, created, livemode, stripe_customer_id, state, attempts,
                        last_error, received_at,
                        CASE WHEN type = 'customer.updated' AND next_supersedes THEN NULL
                             ELSE payload END,
                        next_attempt_at
                 FROM (SELECT w.*, coalesce(lead(w.type = 'customer.updated' AND w.due)
                                            OVER (ORDER BY w.created, w.seq), 0)
                                   AS next_supersedes
                       FROM (SELECT e.id, e.type, q.created, q.seq, e.livemode,
                                    e.stripe_customer_id, q.state, q.attempts, q.last_error,
                                    e.received_at, e.payload, q.next_attempt_at,
                                    (q.next_attempt_at IS NULL OR q.next_attempt_at <= ?3) AS due
                             FROM stripe_event_queue q JOIN stripe_events e ON e.id = q.event_id
                             WHERE q.stripe_customer_id = ?1
                               AND (q.state = 'pending' OR q.next_attempt_at IS NOT NULL)
                             ORDER BY q.created, q.seq
                             LIMIT ?2) AS w)
                 ORDER BY created, seq",
            )
            .bind(customer)
            .bind(i64::from(limit))
            .bind(now)
            .fetch_all(&mut *connection)
            .await?;
            if rows.is_empty() {
                continue;
            }
            let events = rows
                .iter()
                .map(|row| {
                    // The event's columns first, as `event` reads them; then what applying
                    // needs.
                    let head: SqliteEventRow = sqlx::FromRow::from_row(row)?;
                    let next: Option<i64> = row.try_get(10)?;
                    Ok(EventToApply {
                        event: event(head)?,
                        payload: row.try_get(9)?,
                        next_attempt_at: next.map(from_ms).transpose()?,
                    })
                })
                .collect::<StoreResult<Vec<_>>>()?;
            found.push((customer.clone(), events));
        }
        Ok(found)
    }

    async fn update_contexts(&self, customers: &[String]) -> StoreResult<Vec<UpdateContext>> {
        type Row = (
            String,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
            bool,
        );
        let rows = sqlx::query(&format!(
            "SELECT l.stripe_customer_id, l.event_watermark, l.event_watermark_id,
                    l.pushed_email, l.pushed_name, l.pushed_phone, l.pushed_version,
                    EXISTS (SELECT 1 FROM outbox o WHERE o.user_id = l.user_id
                              AND o.kind = 'push_profile' AND o.state IN ('pending', 'in_flight'))
                        AS active_push,
                    {USER_COLUMNS_QUALIFIED}, l.pushed_stamp
             FROM customer_links l JOIN users ON users.id = l.user_id
             WHERE l.stripe_customer_id IN (SELECT value FROM json_each(?1))"
        ))
        .bind(ids_json(customers))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let link: Row = sqlx::FromRow::from_row(row)?;
                let (customer_id, watermark, watermark_id, email, name, phone, version, active) =
                    link;
                let user_row: SqliteUserRow = (
                    row.try_get(8)?,
                    row.try_get(9)?,
                    row.try_get(10)?,
                    row.try_get(11)?,
                    row.try_get(12)?,
                    row.try_get(13)?,
                    row.try_get(14)?,
                    row.try_get(15)?,
                    row.try_get(16)?,
                    row.try_get(17)?,
                );
                Ok(UpdateContext {
                    customer_id,
                    user: user(user_row)?,
                    watermark: watermark.map(|created| (created, watermark_id)),
                    active_push: active,
                    last_push: pushed_profile(email, name, phone, version),
                    pushed_stamp: row.try_get(18)?,
                })
            })
            .collect()
    }

    async fn commit_customer_updates(
        &self,
        updates: &[CustomerUpdate],
    ) -> StoreResult<Vec<String>> {
        let now = to_ms(now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut conflicts = Vec::new();
        let mut finished = Vec::new();
        for update in updates {
            if let Some(profile) = &update.profile {
                let Some(saved) =
                    update_user_in(&mut tx, &profile.user, profile.expected, now).await?
                else {
                    conflicts.push(update.customer_id.clone());
                    continue;
                };
                record_pushed_on(
                    &mut tx,
                    &profile.user.id,
                    &profile.pushed,
                    saved.version,
                    None,
                    now,
                )
                .await?;
            }
            if let Some((created, event_id)) = &update.watermark {
                raise_watermark_on(&mut tx, &update.customer_id, *created, event_id).await?;
            }
            finished.extend(update.events.iter().cloned());
        }
        finish_applied_in(&mut tx, &finished, now).await?;
        tx.commit().await?;
        Ok(conflicts)
    }

    async fn finish_events(&self, ids: &[String], outcome: &EventOutcome) -> StoreResult<()> {
        let now = to_ms(now());
        match outcome {
            // The event row is rewritten only for an event that failed before, to keep its
            // attempt count; the common case deletes queue rows and nothing else.
            EventOutcome::Applied => {
                let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
                finish_applied_in(&mut tx, ids, now).await?;
                tx.commit().await?;
            }
            EventOutcome::Retry { delay, error } => {
                sqlx::query(
                    "UPDATE stripe_event_queue SET state = 'failed', attempts = attempts + 1,
                            last_error = ?2, next_attempt_at = ?3
                     WHERE event_id IN (SELECT value FROM json_each(?1))",
                )
                .bind(ids_json(ids))
                .bind(clip_error(error))
                .bind(now + ms(*delay))
                .execute(&self.pool)
                .await?;
            }
            EventOutcome::Failed { error } => {
                sqlx::query(
                    "UPDATE stripe_event_queue SET state = 'failed', attempts = attempts + 1,
                            last_error = ?2, next_attempt_at = NULL
                     WHERE event_id IN (SELECT value FROM json_each(?1))",
                )
                .bind(ids_json(ids))
                .bind(clip_error(error))
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }

    async fn raise_link_watermark(
        &self,
        customer: &str,
        created: i64,
        event_id: &str,
    ) -> StoreResult<()> {
        let mut connection = self.pool.acquire().await?;
        raise_watermark_on(&mut connection, customer, created, event_id).await?;
        Ok(())
    }

    async fn apply_remote_profile(
        &self,
        input: &UserUpsert,
        expected: i64,
        pushed: &PushedProfile,
    ) -> StoreResult<Option<User>> {
        let now = to_ms(now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let written = update_user_in(&mut tx, input, expected, now).await?;
        let Some(saved) = written else {
            tx.rollback().await?;
            return Ok(None);
        };
        record_pushed_on(&mut tx, &input.id, pushed, saved.version, None, now).await?;
        tx.commit().await?;
        Ok(Some(saved))
    }

    async fn cancel_customer_subscriptions(
        &self,
        customer: &str,
        created: i64,
        event_id: &str,
    ) -> StoreResult<u64> {
        Ok(sqlx::query(
            "UPDATE subscriptions SET status = 'canceled', cancel_at_period_end = 1, updated_at = ?2,
                    event_watermark_id = CASE WHEN event_watermark IS NULL OR event_watermark <= ?3
                                              THEN ?4 ELSE event_watermark_id END,
                    event_watermark = MAX(COALESCE(event_watermark, ?3), ?3)
             WHERE stripe_customer_id = ?1",
        )
        .bind(customer)
        .bind(to_ms(now()))
        .bind(created)
        .bind(event_id)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn subscription_watermark(&self, id: &str) -> StoreResult<Option<(i64, Option<String>)>> {
        let row: Option<(Option<i64>, Option<String>)> = sqlx::query_as(
            "SELECT event_watermark, event_watermark_id FROM subscriptions WHERE id = ?1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(created, id)| created.map(|c| (c, id))))
    }

    async fn upsert_subscription_if_newer(
        &self,
        sub: &SubscriptionMirror,
        created: i64,
        event_id: &str,
    ) -> StoreResult<bool> {
        Ok(sqlx::query(
            "INSERT INTO subscriptions (id, user_id, stripe_customer_id, status, price_id,
                                        cancel_at_period_end, current_period_end, event_watermark,
                                        event_watermark_id, created_at, updated_at, cancel_at,
                                        canceled_at, ended_at, items)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?10, ?9, ?9, ?11, ?12, ?13, ?14)
             ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id,
                stripe_customer_id = excluded.stripe_customer_id, status = excluded.status,
                price_id = excluded.price_id, cancel_at_period_end = excluded.cancel_at_period_end,
                current_period_end = excluded.current_period_end,
                event_watermark = excluded.event_watermark,
                event_watermark_id = excluded.event_watermark_id, updated_at = excluded.updated_at,
                cancel_at = excluded.cancel_at, canceled_at = excluded.canceled_at,
                ended_at = excluded.ended_at, items = excluded.items
             WHERE subscriptions.event_watermark IS NULL
                OR subscriptions.event_watermark <= excluded.event_watermark",
        )
        .bind(&sub.id)
        .bind(sub.user_id.as_ref().map(UserId::as_str))
        .bind(&sub.customer_id)
        .bind(&sub.status)
        .bind(&sub.price_id)
        .bind(sub.cancel_at_period_end)
        .bind(sub.current_period_end.map(to_ms))
        .bind(created)
        .bind(to_ms(sub.updated_at))
        .bind(event_id)
        .bind(sub.cancel_at.map(to_ms))
        .bind(sub.canceled_at.map(to_ms))
        .bind(sub.ended_at.map(to_ms))
        .bind(super::items_json(&sub.items))
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    async fn try_claim_resolve(
        &self,
        user_id: &UserId,
        holder: &str,
        lease: Duration,
    ) -> StoreResult<Option<ResolveClaim>> {
        let now = now();
        let claim: Option<(i64, Option<String>)> = sqlx::query_as(
            "INSERT INTO customer_resolve_claims (user_id, holder, started_at, lease_until)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (user_id) DO UPDATE
                SET holder = excluded.holder, lease_until = excluded.lease_until
                WHERE customer_resolve_claims.lease_until <= excluded.started_at
             RETURNING started_at, create_params",
        )
        .bind(user_id.as_str())
        .bind(holder)
        .bind(to_ms(now))
        .bind(to_ms(now + lease))
        .fetch_optional(&self.pool)
        .await?;
        claim
            .map(|(ms, create_params)| {
                Ok(ResolveClaim {
                    started_at: from_ms(ms)?,
                    create_params,
                })
            })
            .transpose()
    }

    async fn save_claim_params(
        &self,
        user_id: &UserId,
        holder: &str,
        params: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE customer_resolve_claims SET create_params = ?3
             WHERE user_id = ?1 AND holder = ?2 AND create_params IS NULL",
        )
        .bind(user_id.as_str())
        .bind(holder)
        .bind(params)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release_resolve(
        &self,
        user_id: &UserId,
        holder: &str,
        completed: bool,
    ) -> StoreResult<()> {
        if completed {
            sqlx::query("DELETE FROM customer_resolve_claims WHERE user_id = ?1 AND holder = ?2")
                .bind(user_id.as_str())
                .bind(holder)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query(
                "UPDATE customer_resolve_claims SET lease_until = ?3 WHERE user_id = ?1 AND holder = ?2",
            )
            .bind(user_id.as_str())
            .bind(holder)
            .bind(to_ms(now()))
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }
}

static RETRY_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE outbox SET state = CASE WHEN {SUPERSEDED} THEN 'done' ELSE 'pending' END,
                next_attempt_at = ?4, locked_until = NULL, last_error = ?3, updated_at = ?2
         WHERE id = ?1 AND claim_token = ?5 AND state = 'in_flight'"
    )
});
