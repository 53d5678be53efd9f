//! The production store. Leases and timestamps use the database clock, so instances with
//! skewed clocks still agree. What only Postgres does: session advisory locks on claimed jobs
//! (`job_locks`) and on customers being applied (`leases`), batches in one statement
//! (`batches`), and the link cache kept coherent by LISTEN/NOTIFY.

use std::{collections::HashMap, sync::Arc, time::Duration};

use sqlx::{
    pool::PoolConnection,
    postgres::{PgListener, PgPoolOptions},
    PgPool, Postgres,
};

use super::{
    link_cache::{self, LinkCache},
    StoreOptions, StoreResult,
};

mod batches;
// The shared statements, compiled for this backend (the other mounts them too).
#[allow(clippy::duplicate_mod)]
#[path = "../common/mod.rs"]
mod common;
mod dialect;
mod job_locks;
mod leases;

type Backend = PgStore;

type SharedLockSession = Arc<tokio::sync::Mutex<LockSession>>;

/// A lock connection and how many locks (customers' or jobs') it holds.
struct LockSession {
    connection: Option<PoolConnection<Postgres>>,
    held: usize,
}

impl LockSession {
    fn shared(connection: PoolConnection<Postgres>, held: usize) -> SharedLockSession {
        Arc::new(tokio::sync::Mutex::new(Self {
            connection: Some(connection),
            held,
        }))
    }

    /// Runs `unlock`, which frees `count` of the session's locks. A session left holding
    /// none goes back to the pool; one whose unlock failed is closed, never returned to the
    /// pool still holding locks (closing frees them). Nothing to do for a closed one.
    async fn unlock(
        &mut self,
        unlock: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
        count: usize,
    ) -> sqlx::Result<()> {
        let Some(connection) = self.connection.as_mut() else {
            return Ok(());
        };
        match unlock.execute(&mut **connection).await {
            Ok(_) => {
                self.held = self.held.saturating_sub(count);
                if self.held == 0 {
                    self.connection = None;
                }
                Ok(())
            }
            Err(err) => {
                if let Some(connection) = self.connection.take() {
                    drop(connection.detach());
                }
                Err(err)
            }
        }
    }
}

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Only for the connections in `customer_locks`.
    lock_pool: PgPool,
    push_debounce: Duration,
    /// What a user's plan is, for `plan.changed` when their subscriptions change.
    plans: Arc<crate::plans::Plans>,
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

/// Connections holding customer locks at once: one per batch of customers being applied
/// (an applier holds one batch at a time), with room for several appliers in one process.
const CUSTOMER_LOCK_CONNECTIONS: u32 = 4;

/// Connections holding job locks at once: one per claim in progress (a worker's batch, or an
/// erasure run by its request).
const JOB_LOCK_CONNECTIONS: u32 = 8;

/// Entries kept at most; ~200 bytes each.
const LINK_CACHE_CAPACITY: usize = 100_000;

impl PgStore {
    pub async fn connect(url: &str, options: &StoreOptions) -> StoreResult<Self> {
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
            plans: options.plans.clone(),
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
