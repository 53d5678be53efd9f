use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{
    postgres::{PgListener, PgPoolOptions},
    PgPool,
};

use super::{
    link_cache::{self, LinkCache},
    link_from_row, opt_str, user_from_row, CustomerLink, LinkOutcome, LinkRow, ResolveClaim, Store,
    StoreResult, User, UserRow, UserUpsert,
};
use crate::domain::{LinkSource, StripeCustomerId, UserId};

const USER_COLUMNS: &str =
    "id, email, email_verified, first_name, last_name, phone, version, created_at, updated_at";
const LINK_COLUMNS: &str = "user_id, stripe_customer_id, livemode, linked_via, linked_at";

/// The production store. Leases and timestamps use the database clock, so instances with
/// skewed clocks still agree.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    links: Arc<LinkCache>,
    _listener: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

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
        let links = Arc::new(LinkCache::new(options.link_cache_ttl, LINK_CACHE_CAPACITY));
        let listener = if options.link_cache_ttl.is_zero() {
            tokio::spawn(async {})
        } else {
            tokio::spawn(listen_for_link_changes(pool.clone(), links.clone()))
        };
        Ok(Self {
            pool,
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

    async fn upsert_user(&self, user: &UserUpsert) -> StoreResult<User> {
        let sql = format!(
            "INSERT INTO users (id, email, email_verified, first_name, last_name, phone, version, \
                                created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, 1, date_trunc('milliseconds', now()), \
                     date_trunc('milliseconds', now()))
             ON CONFLICT (id) DO UPDATE SET
                email = EXCLUDED.email, email_verified = EXCLUDED.email_verified,
                first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name,
                phone = EXCLUDED.phone, version = users.version + 1,
                updated_at = EXCLUDED.updated_at
             WHERE (users.email, users.email_verified, users.first_name, users.last_name, users.phone)
                   IS DISTINCT FROM (EXCLUDED.email, EXCLUDED.email_verified, EXCLUDED.first_name,
                                     EXCLUDED.last_name, EXCLUDED.phone)
             RETURNING {USER_COLUMNS}"
        );
        let written: Option<UserRow> = sqlx::query_as(&sql)
            .bind(user.id.as_str())
            .bind(user.email.as_str())
            .bind(user.email_verified)
            .bind(opt_str(&user.first_name))
            .bind(opt_str(&user.last_name))
            .bind(opt_str(&user.phone))
            .fetch_optional(&self.pool)
            .await?;
        match written {
            Some(row) => user_from_row(row),
            // Nothing changed: the row is as requested already.
            None => self
                .get_user(&user.id)
                .await?
                .ok_or_else(|| super::StoreError::Corrupt("user vanished during upsert".into())),
        }
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

    async fn try_claim_resolve(
        &self,
        user: &UserId,
        holder: &str,
        lease: Duration,
    ) -> StoreResult<Option<ResolveClaim>> {
        let started_at: Option<time::OffsetDateTime> = sqlx::query_scalar(
            "INSERT INTO customer_resolve_claims (user_id, holder, started_at, lease_until)
             VALUES ($1, $2, date_trunc('milliseconds', now()),
                     now() + make_interval(secs => $3))
             ON CONFLICT (user_id) DO UPDATE
                SET holder = EXCLUDED.holder, lease_until = EXCLUDED.lease_until
                WHERE customer_resolve_claims.lease_until <= now()
             RETURNING started_at",
        )
        .bind(user.as_str())
        .bind(holder)
        .bind(lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        Ok(started_at.map(|started_at| ResolveClaim { started_at }))
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
