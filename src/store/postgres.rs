use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{
    pool::PoolConnection,
    postgres::{PgListener, PgPoolOptions},
    PgPool, Postgres, Row, Transaction,
};
use time::OffsetDateTime;

use super::{
    clip_error, event_from_parts, is_unique_violation, job_from_parts,
    link_cache::{self, LinkCache},
    link_from_row, opt_str, parse_json, pushed_profile, user_from_row, AuditEntry, CustomerLink,
    CustomerUpdate, Erased, EventOutcome, EventState, EventToApply, JobOutcome, JobState,
    LinkOutcome, LinkRow, NewEvent, OutboxJob, PushedProfile, RemoteProfile, ResolveClaim, Store,
    StoreError, StoreResult, StoredEvent, SubscriptionMirror, UpdateContext, UsageRecord, User,
    UserRow, UserUpsert, DUE_WINDOW_PER_CUSTOMER,
};
use crate::domain::{LinkSource, StripeCustomerId, UserId};

const USER_COLUMNS: &str = "id, email, email_verified, first_name, last_name, phone, version, \
     created_at, updated_at, email_as_given";
const LINK_COLUMNS: &str = "user_id, stripe_customer_id, livemode, linked_via, linked_at";
const USER_COLUMNS_QUALIFIED: &str = "users.id, users.email, users.email_verified, \
     users.first_name, users.last_name, users.phone, users.version, users.created_at, \
     users.updated_at, users.email_as_given";
/// True when the proposed profile (`excluded`) differs from the stored one.
const USER_CHANGED: &str = "(users.email, users.email_verified, users.first_name, \
     users.last_name, users.phone) IS DISTINCT FROM (excluded.email, excluded.email_verified, \
     excluded.first_name, excluded.last_name, excluded.phone)";
const JOB_COLUMNS: &str = "id, kind, user_id, payload, state, attempts, last_error, \
     claim_token, next_attempt_at, created_at, updated_at";
/// The first key of a job's session advisory lock (`pg_advisory_lock(int4, int4)`; the second
/// is the job id mod 2^31-1): its holder's session is alive while the job runs.
const JOB_LOCK_SPACE: i32 = 0x6F62_7831; // "obx1"
/// An in-flight job whose holder's session is gone (crashed, or its connection dropped):
/// free to claim again, even before its lease ends.
const JOB_LOCK_FREE: &str = "NOT EXISTS (SELECT 1 FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
       AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
       AND l.classid::bigint = 1868724273 AND l.objid::bigint = o.id % 2147483647)";
/// Another job that makes this one redundant: a pending push for the same user, or an
/// active erasure.
const SUPERSEDED: &str = "EXISTS (SELECT 1 FROM outbox other WHERE other.user_id = outbox.user_id \
     AND other.kind = outbox.kind AND other.id <> outbox.id \
     AND (other.state = 'pending' OR (other.kind = 'erase' AND other.state = 'in_flight')))";

const EVENT_COLUMNS: &str = "id, type, created, livemode, stripe_customer_id, state, attempts, \
     last_error, received_at";
type PgEventRow = (
    String,
    String,
    i64,
    bool,
    Option<String>,
    String,
    i32,
    Option<String>,
    OffsetDateTime,
);

fn event(row: PgEventRow) -> StoreResult<StoredEvent> {
    let (id, kind, created, livemode, customer, state, attempts, last_error, received_at) = row;
    event_from_parts(
        (
            id, kind, created, livemode, customer, state, attempts, last_error,
        ),
        received_at,
    )
}

type PgJobRow = (
    i64,
    String,
    String,
    String,
    String,
    i32,
    Option<String>,
    Option<String>,
    OffsetDateTime,
    OffsetDateTime,
    OffsetDateTime,
);

fn job(row: PgJobRow) -> StoreResult<OutboxJob> {
    let (id, kind, user_id, payload, state, attempts, last_error, token, next, created, updated) =
        row;
    job_from_parts(
        (
            id, kind, user_id, payload, state, attempts, last_error, token,
        ),
        next,
        created,
        updated,
    )
}

/// Writes the user's profile if its version is still `expected` and something differs;
/// the new row, or `None`.
async fn update_user_in(
    tx: &mut Transaction<'_, Postgres>,
    user: &UserUpsert,
    expected: i64,
) -> StoreResult<Option<User>> {
    let row: Option<UserRow> = sqlx::query_as(&format!(
        "UPDATE users SET email = $2, email_verified = $3, first_name = $4, last_name = $5,
                phone = $6, email_as_given = $8, version = users.version + 1,
                updated_at = date_trunc('milliseconds', now())
         FROM (SELECT $2::text AS email, $3::boolean AS email_verified, $4::text AS first_name,
                      $5::text AS last_name, $6::text AS phone) AS excluded
         WHERE users.id = $1 AND users.version = $7 AND {USER_CHANGED}
         RETURNING {USER_COLUMNS_QUALIFIED}"
    ))
    .bind(user.id.as_str())
    .bind(user.email.as_str())
    .bind(user.email_verified)
    .bind(opt_str(&user.first_name))
    .bind(opt_str(&user.last_name))
    .bind(opt_str(&user.phone))
    .bind(expected)
    .bind(user.email.as_given())
    .fetch_optional(&mut **tx)
    .await?;
    row.map(user_from_row).transpose()
}

/// Finishes applied events: deletes their queue rows; the event row is rewritten only for an
/// event that failed before, to keep its attempt count.
const FINISH_APPLIED: &str = "WITH done AS (
         DELETE FROM stripe_event_queue WHERE event_id = ANY($1)
         RETURNING event_id, attempts)
     UPDATE stripe_events e
     SET state = 'applied', attempts = done.attempts, last_error = NULL, applied_at = now()
     FROM done WHERE e.id = done.event_id AND done.attempts > 0";

async fn finish_applied_in(tx: &mut Transaction<'_, Postgres>, ids: &[String]) -> StoreResult<()> {
    if !ids.is_empty() {
        sqlx::query(FINISH_APPLIED)
            .bind(ids)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Writes a batch's Stripe-side profile changes, each only if its user is still at the
/// expected version, and records their values as what Stripe holds; returns the customers
/// whose user changed meanwhile.
async fn apply_remote_profiles_in(
    tx: &mut Transaction<'_, Postgres>,
    updates: &[CustomerUpdate],
) -> StoreResult<Vec<String>> {
    let profiles = updates
        .iter()
        .filter_map(|u| u.profile.as_ref().map(|p| (u.customer_id.as_str(), p)))
        .collect::<Vec<_>>();
    if profiles.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: fn(&RemoteProfile) -> Option<&str>| {
        profiles.iter().map(|(_, p)| f(p)).collect::<Vec<_>>()
    };
    let written: Vec<(String, i64)> = sqlx::query_as(&format!(
        "UPDATE users SET email = excluded.email, email_verified = excluded.email_verified,
                first_name = excluded.first_name, last_name = excluded.last_name,
                phone = excluded.phone, email_as_given = excluded.email_as_given,
                version = users.version + 1, updated_at = date_trunc('milliseconds', now())
         FROM unnest($1::text[], $2::text[], $3::boolean[], $4::text[], $5::text[], $6::text[],
                     $7::bigint[], $8::text[])
              AS excluded(id, email, email_verified, first_name, last_name, phone, expected,
                          email_as_given)
         WHERE users.id = excluded.id AND users.version = excluded.expected AND {USER_CHANGED}
         RETURNING users.id, users.version"
    ))
    .bind(column(|p| Some(p.user.id.as_str())))
    .bind(column(|p| Some(p.user.email.as_str())))
    .bind(
        profiles
            .iter()
            .map(|(_, p)| p.user.email_verified)
            .collect::<Vec<_>>(),
    )
    .bind(column(|p| opt_str(&p.user.first_name)))
    .bind(column(|p| opt_str(&p.user.last_name)))
    .bind(column(|p| opt_str(&p.user.phone)))
    .bind(profiles.iter().map(|(_, p)| p.expected).collect::<Vec<_>>())
    .bind(column(|p| p.user.email.as_given()))
    .fetch_all(&mut **tx)
    .await?;
    let version_of = written.into_iter().collect::<HashMap<_, _>>();
    let mut conflicts = Vec::new();
    let mut pushed = Vec::new();
    for (customer, profile) in &profiles {
        match version_of.get(profile.user.id.as_str()) {
            Some(version) => pushed.push((profile, *version)),
            None => conflicts.push((*customer).to_owned()),
        }
    }
    if !pushed.is_empty() {
        let column = |f: fn(&PushedProfile) -> Option<&str>| {
            pushed.iter().map(|(p, _)| f(&p.pushed)).collect::<Vec<_>>()
        };
        sqlx::query(
            "UPDATE customer_links l SET pushed_email = x.email, pushed_name = x.name,
                    pushed_phone = x.phone, pushed_version = x.version, pushed_at = now()
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                  AS x(user_id, email, name, phone, version)
             WHERE l.user_id = x.user_id",
        )
        .bind(
            pushed
                .iter()
                .map(|(p, _)| p.user.id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(column(|p| Some(p.email.as_str())))
        .bind(column(|p| p.name.as_deref()))
        .bind(column(|p| p.phone.as_deref()))
        .bind(pushed.iter().map(|(_, v)| *v).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(conflicts)
}

async fn get_user_in(tx: &mut Transaction<'_, Postgres>, id: &UserId) -> StoreResult<Option<User>> {
    let row: Option<UserRow> =
        sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&mut **tx)
            .await?;
    row.map(user_from_row).transpose()
}

type SharedLockSession = Arc<tokio::sync::Mutex<LockSession>>;

/// A lock connection and how many customer locks it holds for a batch.
struct LockSession {
    connection: Option<PoolConnection<Postgres>>,
    held: usize,
}

/// The production store. Leases and timestamps use the database clock, so instances with
/// skewed clocks still agree.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Only for the connections in `customer_locks`.
    lock_pool: PgPool,
    push_debounce: Duration,
    /// Connections holding a customer's advisory lock while its events are applied.
    /// Per customer: its holder, and the session holding its lock.
    customer_locks: Arc<std::sync::Mutex<HashMap<String, (String, SharedLockSession)>>>,
    /// Connections holding claimed jobs' advisory locks, apart from the other pools.
    job_lock_pool: PgPool,
    /// Per claimed job: its claim token, and the session holding its lock.
    job_locks: Arc<std::sync::Mutex<HashMap<i64, (String, SharedLockSession)>>>,
    links: Arc<LinkCache>,
    _listener: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PgStore {
    /// Queues a push of the user's profile, unless one is already pending (it will push the
    /// newest state when it runs).
    async fn enqueue_push(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        user: &UserId,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO outbox (kind, user_id, payload, state, attempts, next_attempt_at,
                                 created_at, updated_at)
             VALUES ('push_profile', $1, '{}', 'pending', 0,
                     now() + make_interval(secs => $2), now(), now())
             ON CONFLICT (user_id) WHERE kind = 'push_profile' AND state = 'pending' DO NOTHING",
        )
        .bind(user.as_str())
        .bind(self.push_debounce.as_secs_f64())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

type JobClaim<'q> = sqlx::query::QueryAs<'q, Postgres, PgJobRow, sqlx::postgres::PgArguments>;

impl PgStore {
    /// Runs a claiming statement on a connection of its own and, in the same transaction,
    /// takes each claimed job's session advisory lock there: the lock stays held until the
    /// job is finished, or until this process dies and Postgres frees it, so another
    /// instance takes the job over at once. A claim that a concurrent claimer's in-flight
    /// job of the same user refuses (the unique index) claims nothing.
    async fn claim_locked(&self, claim: JobClaim<'_>) -> StoreResult<Vec<OutboxJob>> {
        let mut connection = self.job_lock_pool.acquire().await?;
        let claimed: Result<Vec<PgJobRow>, sqlx::Error> = async {
            sqlx::query("BEGIN").execute(&mut *connection).await?;
            claim.fetch_all(&mut *connection).await
        }
        .await;
        let rows = match claimed {
            Ok(rows) if rows.is_empty() => {
                sqlx::query("COMMIT").execute(&mut *connection).await?;
                return Ok(Vec::new());
            }
            Ok(rows) => rows,
            Err(err) => {
                // Closing the connection ends its transaction; it holds no lock yet.
                drop(connection.detach());
                return if is_unique_violation(&err) {
                    Ok(Vec::new())
                } else {
                    Err(err.into())
                };
            }
        };
        let jobs = match rows.into_iter().map(job).collect::<StoreResult<Vec<_>>>() {
            Ok(jobs) => jobs,
            Err(err) => {
                drop(connection.detach());
                return Err(err);
            }
        };
        // A stale claim of this process on a re-claimed job lets go of its lock first.
        for job in &jobs {
            let stale = self
                .job_locks
                .lock()
                .expect("job lock map poisoned")
                .get(&job.id)
                .map(|(token, _)| token.clone());
            if let Some(token) = stale {
                self.release_job_lock(job.id, &token).await;
            }
        }
        let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
        let locked: Result<Vec<i64>, sqlx::Error> = async {
            let locked = sqlx::query_scalar(
                "SELECT id FROM unnest($1::bigint[]) AS id
                 WHERE pg_try_advisory_lock($2, (id % 2147483647)::int4)",
            )
            .bind(&ids)
            .bind(JOB_LOCK_SPACE)
            .fetch_all(&mut *connection)
            .await?;
            sqlx::query("COMMIT").execute(&mut *connection).await?;
            Ok(locked)
        }
        .await;
        let locked = match locked {
            Ok(locked) => locked,
            Err(err) => {
                // Session locks outlive a rolled-back transaction: closing the connection
                // frees them.
                drop(connection.detach());
                return Err(err.into());
            }
        };
        if !locked.is_empty() {
            let session = Arc::new(tokio::sync::Mutex::new(LockSession {
                connection: Some(connection),
                held: locked.len(),
            }));
            let mut table = self.job_locks.lock().expect("job lock map poisoned");
            for job in jobs.iter().filter(|j| locked.contains(&j.id)) {
                let token = job.claim_token.clone().unwrap_or_default();
                table.insert(job.id, (token, session.clone()));
            }
        }
        Ok(jobs)
    }

    /// Lets go of a claimed job's lock, if this process holds it for that claim.
    async fn release_job_lock(&self, id: i64, token: &str) {
        let session = {
            let mut table = self.job_locks.lock().expect("job lock map poisoned");
            if table.get(&id).is_none_or(|(held, _)| held != token) {
                return;
            }
            table.remove(&id).map(|(_, session)| session)
        };
        let Some(session) = session else { return };
        let mut session = session.lock().await;
        let Some(connection) = session.connection.as_mut() else {
            return; // closed after an error: its locks are gone
        };
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, ($2 % 2147483647)::int4)")
            .bind(JOB_LOCK_SPACE)
            .bind(id)
            .execute(&mut **connection)
            .await;
        match unlocked {
            Ok(_) => {
                session.held = session.held.saturating_sub(1);
                if session.held == 0 {
                    session.connection = None; // back to the pool, holding nothing
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, job_id = id, "cannot release a job lock; closing its session");
                if let Some(connection) = session.connection.take() {
                    drop(connection.detach());
                }
            }
        }
    }
}

/// Connections holding customer locks at once: one per batch of customers being applied
/// (an applier holds one batch at a time), with room for several appliers in one process.
const CUSTOMER_LOCK_CONNECTIONS: u32 = 4;

/// Connections holding job locks at once: one per claim in progress (a worker's batch, or an
/// erasure run by its request).
const JOB_LOCK_CONNECTIONS: u32 = 8;

/// Entries kept at most; ~200 bytes each.
const LINK_CACHE_CAPACITY: usize = 100_000;

impl PgStore {
    pub async fn connect(url: &str, options: &super::StoreOptions) -> StoreResult<Self> {
        let pool = PgPoolOptions::new()
            // One more for the link-change listener, which holds its connection.
            .max_connections(options.max_connections + 1)
            // Fail fast when the database is down, so callers answer 503 instead of hanging.
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(url)?;
        // Held connections for the applier's customer locks, apart from the main pool so that
        // locks held across a customer's work never starve ingestion of connections.
        let lock_pool = PgPoolOptions::new()
            .max_connections(CUSTOMER_LOCK_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(url)?;
        let job_lock_pool = PgPoolOptions::new()
            .max_connections(JOB_LOCK_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(url)?;
        let links = Arc::new(LinkCache::new(options.link_cache_ttl, LINK_CACHE_CAPACITY));
        let listener = if options.link_cache_ttl.is_zero() {
            tokio::spawn(async {})
        } else {
            tokio::spawn(listen_for_link_changes(pool.clone(), links.clone()))
        };
        Ok(Self {
            pool,
            lock_pool,
            push_debounce: options.push_debounce,
            customer_locks: Arc::default(),
            job_lock_pool,
            job_locks: Arc::default(),
            links,
            _listener: Arc::new(AbortOnDrop(listener)),
        })
    }

    /// Links served from memory right now (for tests and metrics).
    pub fn cached_links(&self) -> usize {
        self.links.len()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> StoreResult<()> {
        super::postgres_migrator()
            .run(&self.pool)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(inner) => inner.into(),
                other => super::StoreError::Other(sqlx::Error::Migrate(Box::new(other))),
            })
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn users_page(&self, after: Option<&UserId>, limit: u32) -> StoreResult<Vec<User>> {
        let rows: Vec<UserRow> = sqlx::query_as(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE ($1::text IS NULL OR id > $1)
             ORDER BY id LIMIT $2"
        ))
        .bind(after.map(UserId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(user_from_row).collect()
    }

    async fn links_page(
        &self,
        after: Option<&UserId>,
        limit: u32,
    ) -> StoreResult<Vec<CustomerLink>> {
        let rows: Vec<LinkRow> = sqlx::query_as(&format!(
            "SELECT {LINK_COLUMNS} FROM customer_links WHERE ($1::text IS NULL OR user_id > $1)
             ORDER BY user_id LIMIT $2"
        ))
        .bind(after.map(UserId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(link_from_row).collect()
    }

    async fn queue_profile_push(&self, user: &UserId) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        self.enqueue_push(&mut tx, user).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn portal_config(&self, name: &str) -> StoreResult<Option<super::PortalConfigRecord>> {
        let row: Option<(String, String, String, OffsetDateTime)> = sqlx::query_as(
            "SELECT name, stripe_configuration_id, spec_hash, applied_at
             FROM portal_configurations WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(name, id, hash, at)| super::PortalConfigRecord {
            name,
            stripe_configuration_id: id,
            spec_hash: hash,
            applied_at: at,
        }))
    }

    async fn save_portal_config(&self, record: &super::PortalConfigRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO portal_configurations (name, stripe_configuration_id, spec_hash, applied_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET stripe_configuration_id = EXCLUDED.stripe_configuration_id,
                 spec_hash = EXCLUDED.spec_hash, applied_at = EXCLUDED.applied_at",
        )
        .bind(&record.name)
        .bind(&record.stripe_configuration_id)
        .bind(&record.spec_hash)
        .bind(record.applied_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn queue_stats(&self) -> StoreResult<super::QueueStats> {
        let row: (
            i64,
            Option<OffsetDateTime>,
            i64,
            i64,
            Option<OffsetDateTime>,
            i64,
        ) = sqlx::query_as(
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
            outbox_oldest_pending: row.1,
            outbox_failed: row.2,
            events_pending: row.3,
            events_oldest_pending: row.4,
            events_failed: row.5,
        })
    }

    async fn upsert_user(&self, user: &UserUpsert) -> StoreResult<User> {
        let mut tx = self.pool.begin().await?;
        let written: Option<UserRow> = sqlx::query_as(&format!(
            "INSERT INTO users (id, email, email_verified, first_name, last_name, phone, version, \
                                created_at, updated_at, email_as_given)
             VALUES ($1, $2, $3, $4, $5, $6, 1, date_trunc('milliseconds', now()), \
                     date_trunc('milliseconds', now()), $7)
             ON CONFLICT (id) DO UPDATE SET
                email = EXCLUDED.email, email_as_given = EXCLUDED.email_as_given,
                email_verified = EXCLUDED.email_verified,
                first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name,
                phone = EXCLUDED.phone, version = users.version + 1,
                updated_at = EXCLUDED.updated_at
             WHERE {USER_CHANGED}
             RETURNING {USER_COLUMNS}"
        ))
        .bind(user.id.as_str())
        .bind(user.email.as_str())
        .bind(user.email_verified)
        .bind(opt_str(&user.first_name))
        .bind(opt_str(&user.last_name))
        .bind(opt_str(&user.phone))
        .bind(user.email.as_given())
        .fetch_optional(&mut *tx)
        .await?;
        let saved = match written {
            Some(row) => {
                let saved = user_from_row(row)?;
                if saved.version > 1 {
                    self.enqueue_push(&mut tx, &saved.id).await?;
                }
                saved
            }
            // Nothing changed: the row is as requested already.
            None => get_user_in(&mut tx, &user.id)
                .await?
                .ok_or_else(|| StoreError::Corrupt("user vanished during upsert".into()))?,
        };
        tx.commit().await?;
        Ok(saved)
    }

    async fn update_user_if_version(
        &self,
        user: &UserUpsert,
        expected: i64,
    ) -> StoreResult<Option<User>> {
        let mut tx = self.pool.begin().await?;
        let written = update_user_in(&mut tx, user, expected).await?;
        let outcome = match written {
            Some(saved) => {
                self.enqueue_push(&mut tx, &saved.id).await?;
                Some(saved)
            }
            None => get_user_in(&mut tx, &user.id)
                .await?
                .filter(|current| current.version == expected),
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn get_user(&self, id: &UserId) -> StoreResult<Option<User>> {
        let row: Option<UserRow> =
            sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        row.map(user_from_row).transpose()
    }

    async fn get_link(&self, user: &UserId) -> StoreResult<Option<CustomerLink>> {
        if let Some(link) = self.links.get(user.as_str()) {
            return Ok(Some(link));
        }
        let generation = self.links.generation();
        let row: Option<LinkRow> = sqlx::query_as(&format!(
            "SELECT {LINK_COLUMNS} FROM customer_links WHERE user_id = $1"
        ))
        .bind(user.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let link = row.map(link_from_row).transpose()?;
        if let Some(link) = &link {
            self.links.fill(link, generation);
        }
        Ok(link)
    }

    async fn remove_link(&self, user: &UserId) -> StoreResult<Option<CustomerLink>> {
        let row: Option<LinkRow> = sqlx::query_as(&format!(
            "DELETE FROM customer_links WHERE user_id = $1 RETURNING {LINK_COLUMNS}"
        ))
        .bind(user.as_str())
        .fetch_optional(&self.pool)
        .await?;
        // The trigger tells every instance; this one need not wait for its own notification.
        self.links.evict(user.as_str());
        row.map(link_from_row).transpose()
    }

    async fn get_link_by_customer(
        &self,
        customer: &StripeCustomerId,
    ) -> StoreResult<Option<CustomerLink>> {
        let row: Option<LinkRow> = sqlx::query_as(&format!(
            "SELECT {LINK_COLUMNS} FROM customer_links WHERE stripe_customer_id = $1"
        ))
        .bind(customer.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(link_from_row).transpose()
    }

    async fn insert_link(
        &self,
        user: &UserId,
        customer: &StripeCustomerId,
        livemode: bool,
        via: LinkSource,
    ) -> StoreResult<LinkOutcome> {
        let generation = self.links.generation();
        let inserted: Option<LinkRow> = sqlx::query_as(&format!(
            "INSERT INTO customer_links (user_id, stripe_customer_id, livemode, linked_via, linked_at)
             SELECT $1, $2, $3, $4, date_trunc('milliseconds', now())
             WHERE EXISTS (SELECT 1 FROM users WHERE id = $1)
               AND NOT EXISTS (SELECT 1 FROM deleted_customers WHERE stripe_customer_id = $2)
             ON CONFLICT DO NOTHING
             RETURNING {LINK_COLUMNS}"
        ))
        .bind(user.as_str())
        .bind(customer.as_str())
        .bind(livemode)
        .bind(via.as_str())
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = inserted {
            let link = link_from_row(row)?;
            self.links.fill(&link, generation);
            return Ok(LinkOutcome::Linked(link));
        }
        super::explain_link_conflict(self, user, customer).await
    }

    async fn record_deleted_customer(&self, customer: &str, created: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO deleted_customers (stripe_customer_id, deleted_created, recorded_at)
             VALUES ($1, $2, now())
             ON CONFLICT (stripe_customer_id) DO UPDATE
             SET deleted_created = GREATEST(deleted_customers.deleted_created,
                                            EXCLUDED.deleted_created)",
        )
        .bind(customer)
        .bind(created)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn record_push(&self, user: &UserId, pushed: &PushedProfile) -> StoreResult<()> {
        sqlx::query(
            "UPDATE customer_links SET pushed_email = $2, pushed_name = $3, pushed_phone = $4,
                    pushed_version = $5, pushed_stamp = $5, pushed_at = now()
             WHERE user_id = $1",
        )
        .bind(user.as_str())
        .bind(&pushed.email)
        .bind(&pushed.name)
        .bind(&pushed.phone)
        .bind(pushed.version)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn last_push(&self, user: &UserId) -> StoreResult<Option<PushedProfile>> {
        let row: Option<(Option<String>, Option<String>, Option<String>, Option<i64>)> =
            sqlx::query_as(
                "SELECT pushed_email, pushed_name, pushed_phone, pushed_version
                 FROM customer_links WHERE user_id = $1",
            )
            .bind(user.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .and_then(|(email, name, phone, version)| pushed_profile(email, name, phone, version)))
    }

    async fn claim_jobs(&self, limit: u32, lease: Duration) -> StoreResult<Vec<OutboxJob>> {
        // A pending job waits while any job of its user is in flight (the unique index on
        // in-flight rows makes it atomic across instances), and only the user's first due job
        // is taken. An in-flight job is taken over when its lease ran out or its holder's
        // session (and so its lock) is gone.
        let sql = format!(
            "WITH due AS (
                SELECT o.id FROM outbox o
                WHERE (o.state = 'in_flight' AND (o.locked_until < now() OR {JOB_LOCK_FREE}))
                   OR (o.state = 'pending' AND o.next_attempt_at <= now()
                       AND NOT EXISTS (SELECT 1 FROM outbox b
                                       WHERE b.user_id = o.user_id AND b.state = 'in_flight')
                       AND NOT EXISTS (SELECT 1 FROM outbox b
                                       WHERE b.user_id = o.user_id AND b.state = 'pending'
                                         AND b.next_attempt_at <= now()
                                         AND (b.next_attempt_at, b.id)
                                             < (o.next_attempt_at, o.id)))
                ORDER BY o.next_attempt_at, o.id
                LIMIT $1
                FOR UPDATE SKIP LOCKED
             )
             UPDATE outbox SET state = 'in_flight', attempts = outbox.attempts + 1,
                    claim_token = gen_random_uuid()::text,
                    locked_until = now() + make_interval(secs => $2), updated_at = now()
             FROM due WHERE outbox.id = due.id
             RETURNING {}",
            qualified_job_columns()
        );
        let mut jobs = self
            .claim_locked(
                sqlx::query_as(&sql)
                    .bind(i64::from(limit))
                    .bind(lease.as_secs_f64()),
            )
            .await?;
        jobs.sort_by_key(|j| (j.next_attempt_at, j.id));
        Ok(jobs)
    }

    async fn claim_job(&self, id: i64, lease: Duration) -> StoreResult<Option<OutboxJob>> {
        let sql = format!(
            "UPDATE outbox SET state = 'in_flight', attempts = attempts + 1,
                    claim_token = gen_random_uuid()::text,
                    locked_until = now() + make_interval(secs => $2), updated_at = now()
             WHERE id = $1 AND state = 'pending'
               AND NOT EXISTS (SELECT 1 FROM outbox b
                               WHERE b.user_id = outbox.user_id AND b.state = 'in_flight')
             RETURNING {JOB_COLUMNS}"
        );
        Ok(self
            .claim_locked(sqlx::query_as(&sql).bind(id).bind(lease.as_secs_f64()))
            .await?
            .pop())
    }

    async fn finish_job(&self, job: &OutboxJob, outcome: &JobOutcome) -> StoreResult<bool> {
        let Some(token) = job.claim_token.as_deref() else {
            return Ok(false);
        };
        let query = match outcome {
            JobOutcome::Done => sqlx::query(
                "UPDATE outbox SET state = 'done', locked_until = NULL, last_error = NULL,
                        updated_at = now()
                 WHERE id = $1 AND claim_token = $2 AND state = 'in_flight'",
            )
            .bind(job.id)
            .bind(token),
            JobOutcome::Failed { error } => sqlx::query(
                "UPDATE outbox SET state = 'failed', locked_until = NULL, last_error = $3,
                        updated_at = now()
                 WHERE id = $1 AND claim_token = $2 AND state = 'in_flight'",
            )
            .bind(job.id)
            .bind(token)
            .bind(clip_error(error)),
            JobOutcome::Retry { delay, error } => sqlx::query(&RETRY_SQL)
                .bind(job.id)
                .bind(token)
                .bind(clip_error(error))
                .bind(delay.as_secs_f64()),
        };
        let finished = query.execute(&self.pool).await;
        // The claim ends either way: its lock goes (a refused finish means it was lost).
        self.release_job_lock(job.id, token).await;
        Ok(finished?.rows_affected() > 0)
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
            "UPDATE outbox SET payload = $3, updated_at = now()
             WHERE id = $1 AND claim_token = $2 AND state = 'in_flight'",
        )
        .bind(job.id)
        .bind(token)
        .bind(payload.to_string())
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    async fn get_job(&self, id: i64) -> StoreResult<Option<OutboxJob>> {
        let row: Option<PgJobRow> =
            sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM outbox WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(job).transpose()
    }

    async fn list_jobs(&self, state: Option<JobState>, limit: u32) -> StoreResult<Vec<OutboxJob>> {
        let rows: Vec<PgJobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM outbox WHERE ($1::text IS NULL OR state = $1)
             ORDER BY id DESC LIMIT $2"
        ))
        .bind(state.map(JobState::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(job).collect()
    }

    async fn retry_job(&self, id: i64) -> StoreResult<Option<OutboxJob>> {
        let row: Option<PgJobRow> = sqlx::query_as(&format!(
            "UPDATE outbox SET state = CASE WHEN {SUPERSEDED} THEN 'done' ELSE 'pending' END,
                    attempts = 0, next_attempt_at = now(), locked_until = NULL,
                    last_error = NULL, updated_at = now()
             WHERE id = $1 AND state = 'failed'
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(job).transpose()
    }

    async fn enqueue_erase(
        &self,
        user: &UserId,
        payload: &serde_json::Value,
    ) -> StoreResult<OutboxJob> {
        let row: Option<PgJobRow> = sqlx::query_as(&format!(
            "INSERT INTO outbox (kind, user_id, payload, state, attempts, next_attempt_at,
                                 created_at, updated_at)
             VALUES ('erase', $1, $2, 'pending', 0, now() + interval '30 seconds', now(), now())
             ON CONFLICT (user_id) WHERE kind = 'erase' AND state IN ('pending', 'in_flight')
             DO NOTHING
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(user.as_str())
        .bind(payload.to_string())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => job(row),
            None => self
                .active_erase(user)
                .await?
                .ok_or_else(|| StoreError::Corrupt("erase job vanished".into())),
        }
    }

    async fn active_erase(&self, user: &UserId) -> StoreResult<Option<OutboxJob>> {
        let row: Option<PgJobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM outbox
             WHERE user_id = $1 AND kind = 'erase' AND state IN ('pending', 'in_flight')"
        ))
        .bind(user.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(job).transpose()
    }

    async fn erase_user(
        &self,
        user: &UserId,
        handled_customer: Option<&str>,
        subject_hash: &str,
        audit_detail: &serde_json::Value,
    ) -> StoreResult<Erased> {
        let mut tx = self.pool.begin().await?;
        // The row lock keeps a link from being made until this transaction ends (it then
        // finds no user); a link made before it is seen here.
        let linked: Option<Option<String>> = sqlx::query_scalar(
            "SELECT l.stripe_customer_id FROM users u
             LEFT JOIN customer_links l ON l.user_id = u.id
             WHERE u.id = $1 FOR UPDATE OF u",
        )
        .bind(user.as_str())
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
                    "DELETE FROM {table} WHERE stripe_customer_id = $1"
                ))
                .bind(customer)
                .execute(&mut *tx)
                .await?;
            }
        }
        let existed = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(user.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        sqlx::query(
            "DELETE FROM outbox WHERE user_id = $1 AND kind = 'push_profile'
                                  AND state IN ('pending', 'failed')",
        )
        .bind(user.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE outbox SET user_id = 'erased:' || $2, last_error = NULL WHERE user_id = $1",
        )
        .bind(user.as_str())
        .bind(subject_hash)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, subject_hash, detail)
             VALUES (now(), 'billsync', 'account_erased', $1, $2)",
        )
        .bind(subject_hash)
        .bind(audit_detail.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.links.evict(user.as_str());
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
             VALUES (now(), $1, $2, $3, $4)",
        )
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
        user: &UserId,
        metric: &str,
        quantity: i64,
        recorded_at: OffsetDateTime,
    ) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO usage_records (user_id, metric, quantity, recorded_at, created_at)
             VALUES ($1, $2, $3, $4, date_trunc('milliseconds', now())) RETURNING id",
        )
        .bind(user.as_str())
        .bind(metric)
        .bind(quantity)
        .bind(recorded_at)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn setting_or_init(&self, name: &str, value: &str) -> StoreResult<String> {
        Ok(sqlx::query_scalar(
            "WITH written AS (
                 INSERT INTO billsync_settings (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING RETURNING value)
             SELECT value FROM written
             UNION ALL SELECT value FROM billsync_settings WHERE name = $1
             LIMIT 1",
        )
        .bind(name)
        .bind(value)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn record_tombstone(&self, subject: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO erasure_tombstones (subject, erased_at) VALUES ($1, now())
             ON CONFLICT (subject) DO UPDATE SET erased_at = excluded.erased_at",
        )
        .bind(subject)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn tombstone(&self, subject: &str) -> StoreResult<Option<OffsetDateTime>> {
        Ok(
            sqlx::query_scalar("SELECT erased_at FROM erasure_tombstones WHERE subject = $1")
                .bind(subject)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn customer_events_page(
        &self,
        customer: &str,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT id, payload FROM stripe_events
             WHERE stripe_customer_id = $1 AND ($2::TEXT IS NULL OR id > $2)
             ORDER BY id LIMIT $3",
        )
        .bind(customer)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn user_jobs(&self, user: &UserId) -> StoreResult<Vec<OutboxJob>> {
        let rows: Vec<PgJobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM outbox WHERE user_id = $1 ORDER BY id"
        ))
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(job).collect()
    }

    async fn audit_for_subject(&self, subject_hash: &str) -> StoreResult<Vec<AuditEntry>> {
        let rows: Vec<(OffsetDateTime, String, String, String)> = sqlx::query_as(
            "SELECT at, actor, action, detail FROM audit_log WHERE subject_hash = $1 ORDER BY id",
        )
        .bind(subject_hash)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(at, actor, action, detail)| {
                Ok(AuditEntry {
                    at,
                    actor,
                    action,
                    detail: parse_json(&detail)?,
                })
            })
            .collect()
    }

    async fn usage_records_page(
        &self,
        user: &UserId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<UsageRecord>> {
        let rows: Vec<(i64, String, i64, OffsetDateTime, OffsetDateTime)> = sqlx::query_as(
            "SELECT id, metric, quantity, recorded_at, created_at FROM usage_records
             WHERE user_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(user.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, metric, quantity, recorded_at, created_at)| UsageRecord {
                    id,
                    metric,
                    quantity,
                    recorded_at,
                    created_at,
                },
            )
            .collect())
    }

    async fn list_subscriptions(&self, user: &UserId) -> StoreResult<Vec<SubscriptionMirror>> {
        type Row = (
            String,
            Option<String>,
            String,
            String,
            Option<String>,
            bool,
            Option<OffsetDateTime>,
            OffsetDateTime,
            Option<OffsetDateTime>,
            Option<OffsetDateTime>,
            Option<OffsetDateTime>,
            String,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, user_id, stripe_customer_id, status, price_id, cancel_at_period_end,
                    current_period_end, updated_at, cancel_at, canceled_at, ended_at, items
             FROM subscriptions WHERE user_id = $1 ORDER BY id",
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
                    current_period_end: period_end,
                    updated_at,
                    cancel_at: row.8,
                    canceled_at: row.9,
                    ended_at: row.10,
                    items: super::items_from_json(&row.11)?,
                })
            })
            .collect()
    }

    async fn insert_events(&self, events: &[NewEvent]) -> StoreResult<Vec<bool>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // One statement for the whole batch; UNNEST keeps arrival order for arrival_seq. Events
        // to apply also get their queue row, in the same statement.
        let inserted: Vec<String> = sqlx::query_scalar(
            "WITH fresh AS (
                 INSERT INTO stripe_events (id, type, created, livemode, stripe_customer_id,
                                            payload, received_at, state)
                 SELECT e.id, e.type, e.created, e.livemode, e.customer, e.payload, now(), e.state
                 FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::bool[], $5::text[],
                             $6::text[], $7::text[])
                      AS e(id, type, created, livemode, customer, payload, state)
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id, stripe_customer_id, created, arrival_seq, received_at, state),
             queued AS (
                 INSERT INTO stripe_event_queue (event_id, stripe_customer_id, created,
                                                 arrival_seq, received_at)
                 SELECT id, stripe_customer_id, created, arrival_seq, received_at FROM fresh
                 WHERE state = 'pending')
             SELECT id FROM fresh",
        )
        .bind(events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.created).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.livemode).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| e.customer_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.payload.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|e| e.state.as_str()).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        Ok(super::first_inserted(
            events,
            &inserted.into_iter().collect(),
        ))
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
                  JOIN stripe_event_states s ON s.id = q.event_id WHERE q.state = $1)"
            }
            _ => "stripe_event_states",
        };
        let rows: Vec<PgEventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM {source} AS s WHERE ($1::text IS NULL OR state = $1)
             ORDER BY arrival_seq DESC LIMIT $2"
        ))
        .bind(state.map(EventState::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(event).collect()
    }

    async fn replay_event(&self, id: &str) -> StoreResult<Option<StoredEvent>> {
        let mut tx = self.pool.begin().await?;
        // An event without a customer has nothing to apply it to: it stays as it is.
        let queued = sqlx::query(
            "WITH event AS (
                 UPDATE stripe_events SET state = 'pending', attempts = 0, last_error = NULL,
                                          next_attempt_at = NULL, applied_at = NULL
                 WHERE id = $1 AND stripe_customer_id IS NOT NULL
                 RETURNING id, stripe_customer_id, created, arrival_seq, received_at)
             INSERT INTO stripe_event_queue (event_id, stripe_customer_id, created, arrival_seq,
                                             received_at)
             SELECT id, stripe_customer_id, created, arrival_seq, received_at FROM event
             ON CONFLICT (event_id) DO UPDATE
                SET state = 'pending', attempts = 0, next_attempt_at = NULL, last_error = NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let row: Option<PgEventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM stripe_event_states WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        if queued.rows_affected() == 0 && row.is_some() {
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
        Ok(sqlx::query(
            "WITH parked AS (
                 DELETE FROM stripe_event_queue
                 WHERE state = 'failed' AND next_attempt_at IS NULL AND received_at < $1
                 RETURNING event_id
             )
             DELETE FROM stripe_events e WHERE received_at < $1
                AND (NOT EXISTS (SELECT 1 FROM stripe_event_queue q WHERE q.event_id = e.id)
                     OR e.id IN (SELECT event_id FROM parked))",
        )
        .bind(cutoff)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn due_event_customers(&self, limit: u32) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "WITH due AS (
                 (SELECT stripe_customer_id, arrival_seq FROM stripe_event_queue
                  WHERE state = 'pending' ORDER BY arrival_seq LIMIT $2)
                 UNION ALL
                 (SELECT stripe_customer_id, arrival_seq FROM stripe_event_queue
                  WHERE state = 'failed' AND next_attempt_at <= now()
                  ORDER BY arrival_seq LIMIT $2)
             )
             SELECT stripe_customer_id FROM due
             WHERE NOT EXISTS (
                 SELECT 1 FROM stripe_event_queue waiting
                 WHERE waiting.stripe_customer_id = due.stripe_customer_id
                   AND waiting.state = 'failed' AND waiting.next_attempt_at > now())
             GROUP BY stripe_customer_id
             ORDER BY min(arrival_seq)
             LIMIT $1",
        )
        .bind(i64::from(limit))
        .bind(i64::from(limit) * DUE_WINDOW_PER_CUSTOMER)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Session advisory locks on a connection held until release: if this process dies, the
    /// connection closes and Postgres frees the locks at once, so another instance carries on
    /// without waiting for a lease to run out. One connection holds a whole batch.
    async fn try_lease_customers(
        &self,
        customers: &[String],
        holder: &str,
        _lease: Duration,
    ) -> StoreResult<Vec<String>> {
        let mut wanted = customers.to_vec();
        wanted.sort_unstable();
        wanted.dedup(); // a session takes an advisory lock twice: it would stay held once
        let mut connection = self.lock_pool.acquire().await?;
        let locked: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(
            "SELECT c FROM unnest($1::text[]) AS c
             WHERE pg_try_advisory_lock(hashtextextended(c, 42))",
        )
        .bind(&wanted)
        .fetch_all(&mut *connection)
        .await;
        let locked = match locked {
            Ok(locked) => locked,
            Err(err) => {
                // Some locks may be held: closing the connection frees them.
                drop(connection.detach());
                return Err(err.into());
            }
        };
        if !locked.is_empty() {
            let session = Arc::new(tokio::sync::Mutex::new(LockSession {
                connection: Some(connection),
                held: locked.len(),
            }));
            let mut table = self
                .customer_locks
                .lock()
                .expect("customer lock map poisoned");
            for customer in &locked {
                table.insert(customer.clone(), (holder.to_owned(), session.clone()));
            }
        }
        Ok(locked)
    }

    async fn release_customers(&self, customers: &[String], holder: &str) -> StoreResult<()> {
        // Group by the connection holding each lock.
        let mut sessions: Vec<(SharedLockSession, Vec<String>)> = Vec::new();
        {
            let mut table = self
                .customer_locks
                .lock()
                .expect("customer lock map poisoned");
            for customer in customers {
                // Another holder's lease stays.
                if table.get(customer).is_none_or(|(owner, _)| owner != holder) {
                    continue;
                }
                let Some((_, session)) = table.remove(customer) else {
                    continue;
                };
                match sessions.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &session)) {
                    Some((_, held)) => held.push(customer.clone()),
                    None => sessions.push((session, vec![customer.clone()])),
                }
            }
        }
        let mut first_error = None;
        for (session, released) in sessions {
            let mut session = session.lock().await;
            let Some(connection) = session.connection.as_mut() else {
                continue; // closed after an error: its locks are gone
            };
            let unlocked = sqlx::query(
                "SELECT pg_advisory_unlock(hashtextextended(c, 42)) FROM unnest($1::text[]) AS c",
            )
            .bind(&released)
            .execute(&mut **connection)
            .await;
            match unlocked {
                Ok(_) => {
                    session.held = session.held.saturating_sub(released.len());
                    if session.held == 0 {
                        session.connection = None; // back to the pool, holding nothing
                    }
                }
                Err(err) => {
                    // Never return a connection that may still hold locks to the pool:
                    // closing it frees them.
                    if let Some(connection) = session.connection.take() {
                        drop(connection.detach());
                    }
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }

    async fn claim_serving(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn customers_events(
        &self,
        customers: &[String],
        limit: u32,
    ) -> StoreResult<Vec<(String, Vec<EventToApply>)>> {
        // A `customer.updated` followed by another due one is superseded by it: its payload
        // stays in the database.
        let rows = sqlx::query(
            "SELECT x.id, x.type, x.created, x.livemode, x.stripe_customer_id, x.state,
                    x.attempts, x.last_error, x.received_at,
                    CASE WHEN x.type = 'customer.updated' AND x.next_supersedes THEN NULL
                         ELSE x.payload END,
                    x.next_attempt_at, c.customer
             FROM unnest($1::text[]) WITH ORDINALITY AS c(customer, ord)
             CROSS JOIN LATERAL (
                 SELECT w.*, coalesce(lead(w.type = 'customer.updated' AND w.due)
                                      OVER (ORDER BY w.created, w.arrival_seq), false)
                             AS next_supersedes
                 FROM (SELECT e.id, e.type, q.created, q.arrival_seq, e.livemode,
                              e.stripe_customer_id, q.state, q.attempts, q.last_error,
                              e.received_at, e.payload, q.next_attempt_at,
                              (q.next_attempt_at IS NULL OR q.next_attempt_at <= now()) AS due
                       FROM stripe_event_queue q JOIN stripe_events e ON e.id = q.event_id
                       WHERE q.stripe_customer_id = c.customer
                         AND (q.state = 'pending' OR q.next_attempt_at IS NOT NULL)
                       ORDER BY q.created, q.arrival_seq
                       LIMIT $2) AS w
             ) AS x
             ORDER BY c.ord, x.created, x.arrival_seq",
        )
        .bind(customers)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut found: Vec<(String, Vec<EventToApply>)> = Vec::new();
        for row in &rows {
            // The event's columns first, as `event` reads them; then what applying needs.
            let head: PgEventRow = sqlx::FromRow::from_row(row)?;
            let owner: String = row.try_get(11)?;
            let event = EventToApply {
                event: event(head)?,
                payload: row.try_get(9)?,
                next_attempt_at: row.try_get(10)?,
            };
            match found.last_mut() {
                Some((last, events)) if *last == owner => events.push(event),
                _ => found.push((owner, vec![event])),
            }
        }
        Ok(found)
    }

    async fn update_contexts(&self, customers: &[String]) -> StoreResult<Vec<UpdateContext>> {
        let rows = sqlx::query(&format!(
            "SELECT l.stripe_customer_id, {USER_COLUMNS_QUALIFIED}, l.event_watermark,
                    l.event_watermark_id, l.pushed_email, l.pushed_name, l.pushed_phone,
                    l.pushed_version, l.pushed_stamp,
                    EXISTS (SELECT 1 FROM outbox o WHERE o.user_id = l.user_id
                              AND o.kind = 'push_profile' AND o.state IN ('pending', 'in_flight'))
                        AS active_push
             FROM customer_links l JOIN users ON users.id = l.user_id
             WHERE l.stripe_customer_id = ANY($1)"
        ))
        .bind(customers)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let user: UserRow = (
                    row.try_get("id")?,
                    row.try_get("email")?,
                    row.try_get("email_verified")?,
                    row.try_get("first_name")?,
                    row.try_get("last_name")?,
                    row.try_get("phone")?,
                    row.try_get("version")?,
                    row.try_get("created_at")?,
                    row.try_get("updated_at")?,
                    row.try_get("email_as_given")?,
                );
                let watermark: Option<i64> = row.try_get("event_watermark")?;
                Ok(UpdateContext {
                    customer_id: row.try_get("stripe_customer_id")?,
                    user: user_from_row(user)?,
                    watermark: watermark
                        .map(|created| {
                            Ok::<_, sqlx::Error>((created, row.try_get("event_watermark_id")?))
                        })
                        .transpose()?,
                    active_push: row.try_get("active_push")?,
                    last_push: pushed_profile(
                        row.try_get("pushed_email")?,
                        row.try_get("pushed_name")?,
                        row.try_get("pushed_phone")?,
                        row.try_get("pushed_version")?,
                    ),
                    pushed_stamp: row.try_get("pushed_stamp")?,
                })
            })
            .collect()
    }

    async fn commit_customer_updates(
        &self,
        updates: &[CustomerUpdate],
    ) -> StoreResult<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        let conflicts = apply_remote_profiles_in(&mut tx, updates).await?;
        let done = updates
            .iter()
            .filter(|u| !conflicts.contains(&u.customer_id))
            .collect::<Vec<_>>();
        let (customers, created, ids): (Vec<&str>, Vec<i64>, Vec<&str>) = done
            .iter()
            .filter_map(|u| {
                u.watermark
                    .as_ref()
                    .map(|(created, id)| (u.customer_id.as_str(), *created, id.as_str()))
            })
            .fold(
                (vec![], vec![], vec![]),
                |(mut c, mut t, mut i), (cu, cr, id)| {
                    c.push(cu);
                    t.push(cr);
                    i.push(id);
                    (c, t, i)
                },
            );
        if !customers.is_empty() {
            sqlx::query(
                "UPDATE customer_links l SET event_watermark = x.created, event_watermark_id = x.id
                 FROM unnest($1::text[], $2::bigint[], $3::text[]) AS x(customer, created, id)
                 WHERE l.stripe_customer_id = x.customer
                   AND (l.event_watermark IS NULL OR l.event_watermark <= x.created)",
            )
            .bind(&customers)
            .bind(&created)
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        }
        let events = done
            .iter()
            .flat_map(|u| u.events.iter().cloned())
            .collect::<Vec<_>>();
        finish_applied_in(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(conflicts)
    }

    async fn finish_events(&self, ids: &[String], outcome: &EventOutcome) -> StoreResult<()> {
        let query = match outcome {
            // The event row is rewritten only for an event that failed before, to keep its
            // attempt count; the common case deletes queue rows and nothing else.
            EventOutcome::Applied => sqlx::query(FINISH_APPLIED).bind(ids),
            EventOutcome::Retry { delay, error } => sqlx::query(
                "UPDATE stripe_event_queue SET state = 'failed', attempts = attempts + 1,
                        last_error = $2, next_attempt_at = now() + make_interval(secs => $3)
                 WHERE event_id = ANY($1)",
            )
            .bind(ids)
            .bind(clip_error(error))
            .bind(delay.as_secs_f64()),
            EventOutcome::Failed { error } => sqlx::query(
                "UPDATE stripe_event_queue SET state = 'failed', attempts = attempts + 1,
                        last_error = $2, next_attempt_at = NULL
                 WHERE event_id = ANY($1)",
            )
            .bind(ids)
            .bind(clip_error(error)),
        };
        query.execute(&self.pool).await?;
        Ok(())
    }

    async fn raise_link_watermark(
        &self,
        customer: &str,
        created: i64,
        event_id: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE customer_links SET event_watermark = $2, event_watermark_id = $3
             WHERE stripe_customer_id = $1
               AND (event_watermark IS NULL OR event_watermark <= $2)",
        )
        .bind(customer)
        .bind(created)
        .bind(event_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn apply_remote_profile(
        &self,
        user: &UserUpsert,
        expected: i64,
        pushed: &PushedProfile,
    ) -> StoreResult<Option<User>> {
        let mut tx = self.pool.begin().await?;
        let Some(saved) = update_user_in(&mut tx, user, expected).await? else {
            tx.rollback().await?;
            return Ok(None);
        };
        sqlx::query(
            "UPDATE customer_links SET pushed_email = $2, pushed_name = $3, pushed_phone = $4,
                    pushed_version = $5, pushed_at = now()
             WHERE user_id = $1",
        )
        .bind(user.id.as_str())
        .bind(&pushed.email)
        .bind(&pushed.name)
        .bind(&pushed.phone)
        .bind(saved.version)
        .execute(&mut *tx)
        .await?;
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
            "UPDATE subscriptions SET status = 'canceled', cancel_at_period_end = TRUE,
                    updated_at = now(),
                    event_watermark_id = CASE WHEN event_watermark IS NULL OR event_watermark <= $2
                                              THEN $3 ELSE event_watermark_id END,
                    event_watermark = GREATEST(COALESCE(event_watermark, $2), $2)
             WHERE stripe_customer_id = $1",
        )
        .bind(customer)
        .bind(created)
        .bind(event_id)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn subscription_watermark(&self, id: &str) -> StoreResult<Option<(i64, Option<String>)>> {
        let row: Option<(Option<i64>, Option<String>)> = sqlx::query_as(
            "SELECT event_watermark, event_watermark_id FROM subscriptions WHERE id = $1",
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $10, $9, $9, $11, $12, $13, $14)
             ON CONFLICT (id) DO UPDATE SET user_id = EXCLUDED.user_id,
                stripe_customer_id = EXCLUDED.stripe_customer_id, status = EXCLUDED.status,
                price_id = EXCLUDED.price_id, cancel_at_period_end = EXCLUDED.cancel_at_period_end,
                current_period_end = EXCLUDED.current_period_end,
                event_watermark = EXCLUDED.event_watermark,
                event_watermark_id = EXCLUDED.event_watermark_id, updated_at = EXCLUDED.updated_at,
                cancel_at = EXCLUDED.cancel_at, canceled_at = EXCLUDED.canceled_at,
                ended_at = EXCLUDED.ended_at, items = EXCLUDED.items
             WHERE subscriptions.event_watermark IS NULL
                OR subscriptions.event_watermark <= EXCLUDED.event_watermark",
        )
        .bind(&sub.id)
        .bind(sub.user_id.as_ref().map(UserId::as_str))
        .bind(&sub.customer_id)
        .bind(&sub.status)
        .bind(&sub.price_id)
        .bind(sub.cancel_at_period_end)
        .bind(sub.current_period_end)
        .bind(created)
        .bind(sub.updated_at)
        .bind(event_id)
        .bind(sub.cancel_at)
        .bind(sub.canceled_at)
        .bind(sub.ended_at)
        .bind(super::items_json(&sub.items))
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    async fn try_claim_resolve(
        &self,
        user: &UserId,
        holder: &str,
        lease: Duration,
    ) -> StoreResult<Option<ResolveClaim>> {
        let claim: Option<(OffsetDateTime, Option<String>)> = sqlx::query_as(
            "INSERT INTO customer_resolve_claims (user_id, holder, started_at, lease_until)
             VALUES ($1, $2, date_trunc('milliseconds', now()),
                     now() + make_interval(secs => $3))
             ON CONFLICT (user_id) DO UPDATE
                SET holder = EXCLUDED.holder, lease_until = EXCLUDED.lease_until
                WHERE customer_resolve_claims.lease_until <= now()
             RETURNING started_at, create_params",
        )
        .bind(user.as_str())
        .bind(holder)
        .bind(lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        Ok(claim.map(|(started_at, create_params)| ResolveClaim {
            started_at,
            create_params,
        }))
    }

    async fn save_claim_params(
        &self,
        user: &UserId,
        holder: &str,
        params: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE customer_resolve_claims SET create_params = $3
             WHERE user_id = $1 AND holder = $2 AND create_params IS NULL",
        )
        .bind(user.as_str())
        .bind(holder)
        .bind(params)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release_resolve(
        &self,
        user: &UserId,
        holder: &str,
        completed: bool,
    ) -> StoreResult<()> {
        let sql = if completed {
            "DELETE FROM customer_resolve_claims WHERE user_id = $1 AND holder = $2"
        } else {
            "UPDATE customer_resolve_claims SET lease_until = now() WHERE user_id = $1 AND holder = $2"
        };
        sqlx::query(sql)
            .bind(user.as_str())
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Keeps the link cache coherent with every instance's writes (see `link_cache`).
async fn listen_for_link_changes(pool: PgPool, links: Arc<LinkCache>) {
    loop {
        match subscribe(&pool).await {
            Ok(mut listener) => {
                links.set_listening(true);
                tracing::debug!("link cache listening for changes");
                // `Ok(None)` or an error: connection lost, notifications may have been missed.
                while let Ok(Some(notification)) = listener.try_recv().await {
                    links.evict(notification.payload());
                }
                links.set_listening(false);
                tracing::warn!(
                    "link cache listener lost its connection; cache off until it is back"
                );
            }
            Err(err) => tracing::debug!(error = %err, "link cache listener cannot connect yet"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn subscribe(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(link_cache::CHANNEL).await?;
    Ok(listener)
}

fn qualified_job_columns() -> String {
    JOB_COLUMNS
        .split(", ")
        .map(|c| format!("outbox.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

static RETRY_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE outbox SET state = CASE WHEN {SUPERSEDED} THEN 'done' ELSE 'pending' END,
                next_attempt_at = now() + make_interval(secs => $4), locked_until = NULL,
                last_error = $3, updated_at = now()
         WHERE id = $1 AND claim_token = $2 AND state = 'in_flight'"
    )
});
