//! Persistence. One [`Store`] trait, a Postgres implementation for production (several
//! instances may share it) and a SQLite one as the embedded default. `tests/store_conformance.rs`
//! runs the same suite against both.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use time::OffsetDateTime;

use crate::domain::{Email, LinkSource, PersonName, Phone, StripeCustomerId, UserId};

mod link_cache;
mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
// The entities live in `domain`; re-exported here, where their callers have always found them.
pub use crate::domain::{
    AuditEntry, CustomerLink, CustomerUpdate, Erased, EventOutcome, EventState, EventToApply,
    JobKind, JobOutcome, JobState, LinkOutcome, NewEvent, OutboxJob, PortalConfigRecord,
    PushedProfile, RemoteProfile, ResolveClaim, StoredEvent, SubscriptionItemMirror,
    SubscriptionMirror, UpdateContext, UsageRecord, User, UserUpsert,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached (connection refused, pool exhausted, I/O).
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Another process holds what this one needs alone (a second `serve` on a SQLite file).
    #[error("{0}")]
    InUse(String),
    #[error("stored data is not valid: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Self::Unavailable(err),
            // Postgres shutting down or connection lost mid-query (57P, 08), a serialization
            // failure or deadlock (40001, 40P01); SQLite busy or locked (5, 6, and their
            // extended codes): transient, worth a retry, never the client's fault.
            sqlx::Error::Database(ref db)
                if db.code().is_some_and(|c| {
                    c.starts_with("57P")
                        || c.starts_with("08")
                        || c == "40001"
                        || c == "40P01"
                        || c.parse::<i32>()
                            .is_ok_and(|n| n & 0xff == 5 || n & 0xff == 6)
                }) =>
            {
                Self::Unavailable(err)
            }
            other => Self::Other(other),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

fn items_json(items: &[SubscriptionItemMirror]) -> String {
    serde_json::to_string(items).expect("subscription items serialize")
}

fn items_from_json(raw: &str) -> StoreResult<Vec<SubscriptionItemMirror>> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("subscription items: {e}")))
}

/// Timestamps are stored with millisecond precision on every backend; values made here
/// round-trip exactly.
pub fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .expect("a truncated nanosecond is in range")
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `postgres` or `sqlite`, for logs and metrics.
    fn backend(&self) -> &'static str;
    async fn migrate(&self) -> StoreResult<()>;
    /// A round trip to the database, for readiness.
    async fn ping(&self) -> StoreResult<()>;
    /// Queue depths and ages, for the metrics gauges.
    async fn queue_stats(&self) -> StoreResult<QueueStats>;

    /// Users with `id > after`, by id, at most `limit`: pages for a full scan (reconcile).
    async fn users_page(&self, after: Option<&UserId>, limit: u32) -> StoreResult<Vec<User>>;
    /// Links with `user_id > after`, by user id, at most `limit`.
    async fn links_page(
        &self,
        after: Option<&UserId>,
        limit: u32,
    ) -> StoreResult<Vec<CustomerLink>>;
    /// Queues a push of the user's current profile to Stripe (none if one is pending).
    async fn queue_profile_push(&self, user: &UserId) -> StoreResult<()>;

    async fn portal_config(&self, name: &str) -> StoreResult<Option<PortalConfigRecord>>;
    /// Records (or replaces) what `name` was last applied as.
    async fn save_portal_config(&self, record: &PortalConfigRecord) -> StoreResult<()>;

    /// Creates the user or replaces its profile; `version` increases only when a field changed,
    /// and a change of an existing user queues a profile push in the same transaction.
    async fn upsert_user(&self, user: &UserUpsert) -> StoreResult<User>;
    /// Like `upsert_user` for an existing user, but only if its version is still `expected`
    /// (optimistic concurrency for read-modify-write); `None` when it is not (or is gone).
    async fn update_user_if_version(
        &self,
        user: &UserUpsert,
        expected: i64,
    ) -> StoreResult<Option<User>>;
    async fn get_user(&self, id: &UserId) -> StoreResult<Option<User>>;

    async fn get_link(&self, user: &UserId) -> StoreResult<Option<CustomerLink>>;
    /// Unlinks the user; returns the link that was removed.
    async fn remove_link(&self, user: &UserId) -> StoreResult<Option<CustomerLink>>;
    async fn get_link_by_customer(
        &self,
        customer: &StripeCustomerId,
    ) -> StoreResult<Option<CustomerLink>>;
    /// Links a user to a customer unless either side is already linked or the customer is
    /// known deleted in Stripe.
    async fn insert_link(
        &self,
        user: &UserId,
        customer: &StripeCustomerId,
        livemode: bool,
        via: LinkSource,
    ) -> StoreResult<LinkOutcome>;

    /// Remembers that Stripe deleted this customer (`created` of the `customer.deleted`
    /// event), so it is never linked again, whatever arrives late.
    async fn record_deleted_customer(&self, customer: &str, created: i64) -> StoreResult<()>;
    /// Records what was last pushed to the user's customer; the push stamped
    /// `pushed.version` into the customer's metadata.
    async fn record_push(&self, user: &UserId, pushed: &PushedProfile) -> StoreResult<()>;
    async fn last_push(&self, user: &UserId) -> StoreResult<Option<PushedProfile>>;

    /// Claims up to `limit` due jobs (pending and due, or in flight with an expired lease, or
    /// on Postgres whose holder's session is gone), never two in flight at once for one user
    /// (a unique index makes it atomic). Each claim gets a new `claim_token`; each claimed
    /// job's `attempts` counts this attempt.
    async fn claim_jobs(&self, limit: u32, lease: Duration) -> StoreResult<Vec<OutboxJob>>;
    /// Claims one job now, whatever its due time, if it is pending and no other job of its
    /// user is in flight.
    async fn claim_job(&self, id: i64, lease: Duration) -> StoreResult<Option<OutboxJob>>;
    /// Ends a claim. Fenced: `false` (and nothing written) when the job no longer carries
    /// `job.claim_token` (its lease was lost and another worker re-claimed it).
    async fn finish_job(&self, job: &OutboxJob, outcome: &JobOutcome) -> StoreResult<bool>;
    /// Saves a job's progress (the erasure saga's completed steps); fenced like `finish_job`.
    async fn save_job_payload(
        &self,
        job: &OutboxJob,
        payload: &serde_json::Value,
    ) -> StoreResult<bool>;
    async fn get_job(&self, id: i64) -> StoreResult<Option<OutboxJob>>;
    /// Newest first.
    async fn list_jobs(&self, state: Option<JobState>, limit: u32) -> StoreResult<Vec<OutboxJob>>;
    /// Puts a failed job back in the queue, due now, with its attempts reset; `None` when the
    /// job does not exist or is not failed.
    async fn retry_job(&self, id: i64) -> StoreResult<Option<OutboxJob>>;
    /// The user's erasure job if one is pending or in flight; otherwise a new pending one,
    /// due in 30 s: the caller runs it now (`claim_job`), and the delay keeps workers from
    /// racing it for it; they take it over only if the caller dies first.
    async fn enqueue_erase(
        &self,
        user: &UserId,
        payload: &serde_json::Value,
    ) -> StoreResult<OutboxJob>;
    async fn active_erase(&self, user: &UserId) -> StoreResult<Option<OutboxJob>>;
    /// The erasure's last step, in one transaction: deletes the user (links, subscriptions,
    /// usage and claims go with it), drops their pending pushes, deletes the stored webhook
    /// events of `handled_customer`, renames their jobs to `erased:<subject_hash>`, and
    /// writes the audit entry. Re-plans first, with the user's
    /// row locked (no link can be made meanwhile): if the user is now linked to a customer
    /// other than `handled_customer` (a resolve or a `customer.created` since the saga's
    /// plan), nothing is deleted and that customer is returned, for the saga to handle.
    async fn erase_user(
        &self,
        user: &UserId,
        handled_customer: Option<&str>,
        subject_hash: &str,
        audit_detail: &serde_json::Value,
    ) -> StoreResult<Erased>;
    async fn append_audit(
        &self,
        actor: &str,
        action: &str,
        subject_hash: Option<&str>,
        detail: &serde_json::Value,
    ) -> StoreResult<()>;

    async fn insert_usage_record(
        &self,
        user: &UserId,
        metric: &str,
        quantity: i64,
        recorded_at: OffsetDateTime,
    ) -> StoreResult<i64>;
    /// Records with `id > after`, oldest first, at most `limit`: pages for streaming.
    async fn usage_records_page(
        &self,
        user: &UserId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<UsageRecord>>;

    async fn list_subscriptions(&self, user: &UserId) -> StoreResult<Vec<SubscriptionMirror>>;

    /// The setting `name`, written as `value` first if it has none; returns what is stored
    /// (the first writer wins when instances race).
    async fn setting_or_init(&self, name: &str, value: &str) -> StoreResult<String>;
    /// Records that the person behind `subject` (a keyed hash of their id) was erased now.
    async fn record_tombstone(&self, subject: &str) -> StoreResult<()>;
    /// When the person behind `subject` was erased, if they were.
    async fn tombstone(&self, subject: &str) -> StoreResult<Option<OffsetDateTime>>;

    /// The raw stored events of a customer with `id > after`, by id, at most `limit`: pages
    /// for the GDPR export. `(id, payload)`.
    async fn customer_events_page(
        &self,
        customer: &str,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<(String, String)>>;
    /// Every outbox job of the user, oldest first.
    async fn user_jobs(&self, user: &UserId) -> StoreResult<Vec<OutboxJob>>;
    /// The audit entries about a subject (its hash), oldest first.
    async fn audit_for_subject(&self, subject_hash: &str) -> StoreResult<Vec<AuditEntry>>;

    /// Writes verified events in one transaction; for each, whether it was new (a
    /// redelivery of a stored event changes nothing).
    async fn insert_events(&self, events: &[NewEvent]) -> StoreResult<Vec<bool>>;
    /// Newest first.
    async fn list_events(
        &self,
        state: Option<EventState>,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// Queues a stored event to be applied again; `None` if there is no such event.
    async fn replay_event(&self, id: &str) -> StoreResult<Option<StoredEvent>>;

    /// Queues every failed event to be applied again; returns how many.
    async fn replay_failed_events(&self) -> StoreResult<u64>;
    /// Deletes applied, skipped and parked (failed for good) events received before `cutoff`;
    /// returns how many. Events waiting for a retry stay.
    async fn prune_events(&self, cutoff: OffsetDateTime) -> StoreResult<u64>;
    /// Takes this process's claim on serving the database, for `serve`. On SQLite (one
    /// serving process per file) an exclusive lock on `<file>.lock`, held until the process
    /// ends, refuses a second one with [`StoreError::InUse`]; holding it, the leases left by a
    /// process that died are freed. A no-op on Postgres, where instances share the work and
    /// locks die with their connection.
    async fn claim_serving(&self) -> StoreResult<()>;
    /// Customers with events due to be applied (pending, or failed and due for a retry),
    /// oldest arrival first, leaving out those held back by an event waiting for its retry.
    /// Only the oldest due events are looked at, so the query stays cheap however long the
    /// backlog is.
    async fn due_event_customers(&self, limit: u32) -> StoreResult<Vec<String>>;
    /// Takes the lease on applying each customer's events that nobody holds; returns the
    /// customers leased. One round trip however many customers.
    async fn try_lease_customers(
        &self,
        customers: &[String],
        holder: &str,
        lease: Duration,
    ) -> StoreResult<Vec<String>>;
    async fn release_customers(&self, customers: &[String], holder: &str) -> StoreResult<()>;
    /// Each customer's applicable events in order (Stripe's `created`, then arrival), up to
    /// `limit` per customer, in one query; customers without any are left out.
    async fn customers_events(
        &self,
        customers: &[String],
        limit: u32,
    ) -> StoreResult<Vec<(String, Vec<EventToApply>)>>;
    /// The linked user of each customer, with what applying a snapshot to them needs;
    /// customers not linked to a user are left out.
    async fn update_contexts(&self, customers: &[String]) -> StoreResult<Vec<UpdateContext>>;
    /// Writes a batch of applied `customer.updated` events in one transaction: per customer,
    /// the profile change (if the user is still at its expected version), the watermark, and
    /// the events finished. A customer whose user changed meanwhile is left untouched and
    /// returned, to be applied again. An error writes nothing.
    async fn commit_customer_updates(&self, updates: &[CustomerUpdate])
        -> StoreResult<Vec<String>>;
    /// Records how applying these events ended, in one statement.
    async fn finish_events(&self, ids: &[String], outcome: &EventOutcome) -> StoreResult<()>;
    async fn finish_event(&self, id: &str, outcome: &EventOutcome) -> StoreResult<()> {
        self.finish_events(&[id.to_owned()], outcome).await
    }
    async fn raise_link_watermark(
        &self,
        customer: &str,
        created: i64,
        event_id: &str,
    ) -> StoreResult<()>;
    /// Writes a change that came from Stripe: like `update_user_if_version`, but queues no
    /// push (the change is Stripe's already), and records the values as what Stripe holds.
    async fn apply_remote_profile(
        &self,
        user: &UserUpsert,
        expected: i64,
        pushed: &PushedProfile,
    ) -> StoreResult<Option<User>>;
    /// After `customer.deleted` (its `created` and event id): the customer's subscriptions
    /// become canceled at period end, and their watermark rises to the deletion, so an older
    /// subscription event cannot bring them back.
    async fn cancel_customer_subscriptions(
        &self,
        customer: &str,
        created: i64,
        event_id: &str,
    ) -> StoreResult<u64>;
    /// The `created` and event id of the newest event applied to this subscription.
    async fn subscription_watermark(&self, id: &str) -> StoreResult<Option<(i64, Option<String>)>>;
    /// Upserts the mirror unless it already holds a newer snapshot (`created` below its
    /// watermark); returns whether it wrote.
    async fn upsert_subscription_if_newer(
        &self,
        subscription: &SubscriptionMirror,
        created: i64,
        event_id: &str,
    ) -> StoreResult<bool>;

    /// Takes the user's resolve claim if nobody holds an unexpired one. Re-taking an expired
    /// claim keeps its `started_at`.
    async fn try_claim_resolve(
        &self,
        user: &UserId,
        holder: &str,
        lease: Duration,
    ) -> StoreResult<Option<ResolveClaim>>;
    /// Records the create request of the claim's first attempt (kept if one is recorded).
    async fn save_claim_params(&self, user: &UserId, holder: &str, params: &str)
        -> StoreResult<()>;
    /// Ends a claim held by `holder`: `completed` deletes it, otherwise it is expired at once
    /// (keeping `started_at` for the next attempt).
    async fn release_resolve(
        &self,
        user: &UserId,
        holder: &str,
        completed: bool,
    ) -> StoreResult<()>;
}

/// What is waiting, for an operator's gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    /// Outbox jobs pending or in flight.
    pub outbox_depth: i64,
    pub outbox_oldest_pending: Option<OffsetDateTime>,
    /// Outbox jobs parked as failed, waiting for an operator.
    pub outbox_failed: i64,
    pub events_pending: i64,
    pub events_oldest_pending: Option<OffsetDateTime>,
    pub events_failed: i64,
}

/// `due_event_customers` looks at this many of the oldest due events per customer it returns.
const DUE_WINDOW_PER_CUSTOMER: i64 = 16;

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub max_connections: u32,
    /// A queued profile push waits this long, so a burst of edits makes one push.
    pub push_debounce: Duration,
    /// How long Postgres keeps a customer link in memory at most (0 disables the cache).
    /// Changes evict it at once through LISTEN/NOTIFY; the TTL is a safety net.
    pub link_cache_ttl: Duration,
}

impl StoreOptions {
    pub fn new(max_connections: u32) -> Self {
        Self {
            max_connections,
            push_debounce: Duration::from_millis(300),
            link_cache_ttl: Duration::from_secs(60),
        }
    }
}

/// Opens the store that `database_url` names, creating a SQLite file when missing.
pub async fn connect(database_url: &str, max_connections: u32) -> StoreResult<Arc<dyn Store>> {
    connect_with(database_url, &StoreOptions::new(max_connections)).await
}

pub async fn connect_with(
    database_url: &str,
    options: &StoreOptions,
) -> StoreResult<Arc<dyn Store>> {
    if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(database_url, options).await?))
    } else {
        Ok(Arc::new(SqliteStore::connect(database_url, options).await?))
    }
}

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

/// Columns of a user row, in the order both backends select them.
type UserRow = (
    String,
    String,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    OffsetDateTime,
    OffsetDateTime,
    Option<String>,
);

/// The `pushed_*` columns of a link, when a push (or a Stripe-side change) was recorded.
fn pushed_profile(
    email: Option<String>,
    name: Option<String>,
    phone: Option<String>,
    version: Option<i64>,
) -> Option<PushedProfile> {
    match (email, version) {
        (Some(email), Some(version)) => Some(PushedProfile {
            email,
            name,
            phone,
            version,
        }),
        _ => None,
    }
}

fn user_from_row(row: UserRow) -> StoreResult<User> {
    let (
        id,
        email,
        email_verified,
        first_name,
        last_name,
        phone,
        version,
        created_at,
        updated_at,
        email_as_given,
    ) = row;
    let corrupt = |e: crate::domain::ValidationError| StoreError::Corrupt(e.message);
    Ok(User {
        id: UserId::parse(&id).map_err(corrupt)?,
        email: Email::with_spelling(&email, email_as_given.as_deref()).map_err(corrupt)?,
        email_verified,
        first_name: PersonName::parse_optional(first_name.as_deref(), "first_name")
            .map_err(corrupt)?,
        last_name: PersonName::parse_optional(last_name.as_deref(), "last_name")
            .map_err(corrupt)?,
        phone: phone
            .as_deref()
            .map(Phone::parse)
            .transpose()
            .map_err(corrupt)?,
        version,
        created_at,
        updated_at,
    })
}

type LinkRow = (String, String, bool, String, OffsetDateTime);

fn link_from_row(row: LinkRow) -> StoreResult<CustomerLink> {
    let (user_id, customer_id, livemode, linked_via, linked_at) = row;
    Ok(CustomerLink {
        user_id: UserId::parse(&user_id).map_err(|e| StoreError::Corrupt(e.message))?,
        customer_id: StripeCustomerId::parse(&customer_id)
            .map_err(|e| StoreError::Corrupt(e.message))?,
        livemode,
        linked_via: LinkSource::parse(&linked_via)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown linked_via {linked_via:?}")))?,
        linked_at,
    })
}

fn opt_str<T: AsRef<str>>(value: &Option<T>) -> Option<&str> {
    value.as_ref().map(AsRef::as_ref)
}

/// After an `insert_link` wrote nothing: says which side was already taken.
async fn explain_link_conflict<S: Store + ?Sized>(
    store: &S,
    user: &UserId,
    customer: &StripeCustomerId,
) -> StoreResult<LinkOutcome> {
    if let Some(existing) = store.get_link(user).await? {
        return Ok(LinkOutcome::UserAlreadyLinked(existing));
    }
    if let Some(other) = store.get_link_by_customer(customer).await? {
        return Ok(LinkOutcome::CustomerTaken {
            other_user: other.user_id,
        });
    }
    if store.get_user(user).await?.is_some() {
        return Ok(LinkOutcome::CustomerDeleted);
    }
    Ok(LinkOutcome::UserMissing)
}

/// Columns of an outbox row: id, kind, user_id, payload, state, attempts, last_error,
/// claim_token.
type JobHead = (
    i64,
    String,
    String,
    String,
    String,
    i32,
    Option<String>,
    Option<String>,
);

fn job_from_parts(
    head: JobHead,
    next_attempt_at: OffsetDateTime,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
) -> StoreResult<OutboxJob> {
    let (id, kind, user_id, payload, state, attempts, last_error, claim_token) = head;
    Ok(OutboxJob {
        id,
        kind: JobKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("job kind {kind:?}")))?,
        user_id,
        payload: serde_json::from_str(&payload)
            .map_err(|e| StoreError::Corrupt(format!("job {id} payload: {e}")))?,
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("job state {state:?}")))?,
        attempts,
        claim_token,
        next_attempt_at,
        last_error,
        created_at,
        updated_at,
    })
}

/// A unique index refused the write (e.g. a second job in flight for one user).
fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

fn parse_json(raw: &str) -> StoreResult<serde_json::Value> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("stored JSON: {e}")))
}

/// Errors stored in jobs are for operators, not unbounded.
fn clip_error(error: &str) -> String {
    error.chars().take(1_000).collect()
}

type EventHead = (
    String,
    String,
    i64,
    bool,
    Option<String>,
    String,
    i32,
    Option<String>,
);

fn event_from_parts(head: EventHead, received_at: OffsetDateTime) -> StoreResult<StoredEvent> {
    let (id, kind, created, livemode, customer_id, state, attempts, last_error) = head;
    Ok(StoredEvent {
        state: EventState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("event state {state:?}")))?,
        id,
        kind,
        created,
        livemode,
        customer_id,
        attempts,
        last_error,
        received_at,
    })
}

/// For each event, whether it is the first with its id among `events` and in `inserted`.
fn first_inserted(events: &[NewEvent], inserted: &std::collections::HashSet<String>) -> Vec<bool> {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .map(|e| seen.insert(e.id.as_str()) && inserted.contains(&e.id))
        .collect()
}
