use std::{str::FromStr, time::Duration};

use async_trait::async_trait;
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    SqlitePool,
};
use time::OffsetDateTime;

use super::{
    link_from_row, now, opt_str, user_from_row, CustomerLink, LinkOutcome, ResolveClaim, Store,
    StoreError, StoreResult, User, UserUpsert,
};
use crate::domain::{LinkSource, StripeCustomerId, UserId};

const USER_COLUMNS: &str =
    "id, email, email_verified, first_name, last_name, phone, version, created_at, updated_at";
const LINK_COLUMNS: &str = "user_id, stripe_customer_id, livemode, linked_via, linked_at";

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
);
type SqliteLinkRow = (String, String, bool, String, i64);

fn to_ms(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_ms(ms: i64) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

fn user(row: SqliteUserRow) -> StoreResult<User> {
    let (id, email, verified, first, last, phone, version, created, updated) = row;
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
    ))
}

fn link(row: SqliteLinkRow) -> StoreResult<CustomerLink> {
    let (user_id, customer_id, livemode, via, linked_at) = row;
    link_from_row((user_id, customer_id, livemode, via, from_ms(linked_at)?))
}

/// The embedded store: one file, WAL mode, a busy timeout so concurrent writers wait instead
/// of failing. Every write is a single statement, so no transaction ever upgrades a read lock.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// No link cache here: reads are in-process and cheap, and a second process (the CLI)
    /// could not tell this one about its changes.
    pub async fn connect(url: &str, options: &super::StoreOptions) -> StoreResult<Self> {
        let max_connections = options.max_connections;
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
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

    async fn upsert_user(&self, input: &UserUpsert) -> StoreResult<User> {
        let sql = format!(
            "INSERT INTO users (id, email, email_verified, first_name, last_name, phone, version, \
                                created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7, ?7)
             ON CONFLICT (id) DO UPDATE SET
                email = excluded.email, email_verified = excluded.email_verified,
                first_name = excluded.first_name, last_name = excluded.last_name,
                phone = excluded.phone, version = users.version + 1,
                updated_at = excluded.updated_at
             WHERE users.email IS NOT excluded.email
                OR users.email_verified IS NOT excluded.email_verified
                OR users.first_name IS NOT excluded.first_name
                OR users.last_name IS NOT excluded.last_name
                OR users.phone IS NOT excluded.phone
             RETURNING {USER_COLUMNS}"
        );
        let written: Option<SqliteUserRow> = sqlx::query_as(&sql)
            .bind(input.id.as_str())
            .bind(input.email.as_str())
            .bind(input.email_verified)
            .bind(opt_str(&input.first_name))
            .bind(opt_str(&input.last_name))
            .bind(opt_str(&input.phone))
            .bind(to_ms(now()))
            .fetch_optional(&self.pool)
            .await?;
        match written {
            Some(row) => user(row),
            None => self
                .get_user(&input.id)
                .await?
                .ok_or_else(|| StoreError::Corrupt("user vanished during upsert".into())),
        }
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

    async fn try_claim_resolve(
        &self,
        user_id: &UserId,
        holder: &str,
        lease: Duration,
    ) -> StoreResult<Option<ResolveClaim>> {
        let now = now();
        let started_at: Option<i64> = sqlx::query_scalar(
            "INSERT INTO customer_resolve_claims (user_id, holder, started_at, lease_until)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (user_id) DO UPDATE
                SET holder = excluded.holder, lease_until = excluded.lease_until
                WHERE customer_resolve_claims.lease_until <= excluded.started_at
             RETURNING started_at",
        )
        .bind(user_id.as_str())
        .bind(holder)
        .bind(to_ms(now))
        .bind(to_ms(now + lease))
        .fetch_optional(&self.pool)
        .await?;
        started_at
            .map(|ms| {
                Ok(ResolveClaim {
                    started_at: from_ms(ms)?,
                })
            })
            .transpose()
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
