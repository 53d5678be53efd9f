//! Persistence. One trait per aggregate ([`traits`]), all of them together as [`Store`]; a
//! Postgres implementation for production (several instances may share it) and a SQLite one
//! as the embedded default. The statements both run are written once, in `common/`, which
//! each backend mounts with its own dialect; `postgres/` and `sqlite/` hold only what really
//! differs (leases, job locks, batching, the link cache's listener, the serving lock).
//! `tests/store_conformance/main.rs` runs the same suite against both.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;

use crate::domain::{StripeCustomerId, UserId};

mod link_cache;
mod migrations;
mod postgres;
mod sql;
mod sqlite;
pub mod traits;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use traits::{
    AppEvents, Erasure, EventInbox, Leases, Links, Operations, OutboxJobs, PlanAnnouncements,
    PortalConfigs, ResolveClaims, Store, Subscriptions, Users,
};
// The entities live in `domain`; re-exported here, where their callers have always found them.
pub use crate::domain::{
    AuditEntry, CustomerLink, CustomerUpdate, Erased, EventOutcome, EventState, EventToApply,
    JobKind, JobOutcome, JobState, LinkOutcome, NewEvent, OutboxJob, PortalConfigRecord,
    PushedProfile, RemoteProfile, ResolveClaim, StoredEvent, SubscriptionItemMirror,
    SubscriptionMirror, UpdateContext, UsageRecord, User, UserUpsert,
};

/// Every store trait, for callers of their methods: `use crate::store::prelude::*;`.
pub mod prelude {
    pub use super::traits::{
        AppEvents, Erasure, EventInbox, Leases, Links, Operations, OutboxJobs, PlanAnnouncements,
        PortalConfigs, ResolveClaims, Store, Subscriptions, Users,
    };
}

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

/// Timestamps are stored with millisecond precision on every backend; values made here
/// round-trip exactly.
pub fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .expect("a truncated nanosecond is in range")
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
    /// The plans file, for `plan.changed` (none: nobody has a plan).
    pub plans: Arc<crate::plans::Plans>,
}

impl StoreOptions {
    pub fn new(max_connections: u32) -> Self {
        Self {
            max_connections,
            push_debounce: Duration::from_millis(300),
            link_cache_ttl: Duration::from_secs(60),
            plans: Arc::default(),
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

fn opt_str<T: AsRef<str>>(value: &Option<T>) -> Option<&str> {
    value.as_ref().map(AsRef::as_ref)
}

/// After an `insert_link` wrote nothing: says which side was already taken.
async fn explain_link_conflict<S: Links + Users + ?Sized>(
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

/// For each event, whether it is the first with its id among `events` and in `inserted`.
fn first_inserted(events: &[NewEvent], inserted: &std::collections::HashSet<String>) -> Vec<bool> {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .map(|e| seen.insert(e.id.as_str()) && inserted.contains(&e.id))
        .collect()
}

fn items_json(items: &[SubscriptionItemMirror]) -> String {
    serde_json::to_string(items).expect("subscription items serialize")
}

fn items_from_json(raw: &str) -> StoreResult<Vec<SubscriptionItemMirror>> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("subscription items: {e}")))
}
