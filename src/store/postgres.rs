use std::time::Duration;

use async_trait::async_trait;
use sqlx::{postgres::PgPoolOptions, PgPool};

use super::{
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
}

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            // Fail fast when the database is down, so callers answer 503 instead of hanging.
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(url)?;
        Ok(Self { pool })
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
        let row: Option<LinkRow> = sqlx::query_as(
            "SELECT user_id, stripe_customer_id, livemode, linked_via, linked_at \
             FROM customer_links WHERE user_id = $1",
        )
        .bind(user.as_str())
        .fetch_optional(&self.pool)
        .await?;
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
            return Ok(LinkOutcome::Linked(link_from_row(row)?));
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
