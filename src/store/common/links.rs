use async_trait::async_trait;

use super::{
    app_events::append,
    dialect::{begin_write, ids, sql, Clock, Clocked, Connection},
    rows::{link_from_row, LinkRow},
    Backend,
};
use crate::{
    domain::{
        CustomerLink, LinkOutcome, LinkSource, NewAppEvent, PushedProfile, StripeCustomerId,
        UnlinkReason, UserId,
    },
    store::{explain_link_conflict, pushed_profile, traits::Links, StoreResult},
};

/// Records a profile as what Stripe holds for the user's customer; `stamp`, when the push
/// also stamped its version into the customer's metadata.
pub(crate) async fn record_pushed(
    db: &mut Connection,
    user: &UserId,
    pushed: &PushedProfile,
    version: i64,
    stamp: Option<i64>,
    now: Clock,
) -> StoreResult<()> {
    sqlx::query(&sql(
        "UPDATE customer_links SET pushed_email = $2, pushed_name = $3, pushed_phone = $4,
                pushed_version = $5, pushed_stamp = coalesce($6, pushed_stamp), pushed_at = {now}
         WHERE user_id = $1",
    ))
    .bind(user.as_str())
    .bind(&pushed.email)
    .bind(&pushed.name)
    .bind(&pushed.phone)
    .bind(version)
    .bind(stamp)
    .clock(now)
    .execute(db)
    .await?;
    Ok(())
}

pub(crate) async fn raise_watermark(
    db: &mut Connection,
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
    .execute(db)
    .await?;
    Ok(())
}

/// Reads go through `self.links`, which serves only while it hears of every change (see
/// `link_cache`); writes here evict at once rather than wait for their own notification.
#[async_trait]
impl Links for Backend {
    async fn get_link(&self, user: &UserId) -> StoreResult<Option<CustomerLink>> {
        if let Some(link) = self.links.get(user.as_str()) {
            return Ok(Some(link));
        }
        let generation = self.links.generation();
        let row: Option<LinkRow> = sqlx::query_as(&sql(
            "SELECT {link_columns} FROM customer_links WHERE user_id = $1",
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

    async fn get_link_by_customer(
        &self,
        customer: &StripeCustomerId,
    ) -> StoreResult<Option<CustomerLink>> {
        let row: Option<LinkRow> = sqlx::query_as(&sql(
            "SELECT {link_columns} FROM customer_links WHERE stripe_customer_id = $1",
        ))
        .bind(customer.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(link_from_row).transpose()
    }

    async fn links_of(
        &self,
        customers: &[String],
        users: &[String],
    ) -> StoreResult<Vec<CustomerLink>> {
        let rows: Vec<LinkRow> = sqlx::query_as(&sql("SELECT {link_columns} FROM customer_links
             WHERE stripe_customer_id {in $1} OR user_id {in $2}"))
        .bind(ids(customers))
        .bind(ids(users))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(link_from_row).collect()
    }

    async fn insert_link(
        &self,
        user: &UserId,
        customer: &StripeCustomerId,
        livemode: bool,
        via: LinkSource,
    ) -> StoreResult<LinkOutcome> {
        let generation = self.links.generation();
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        let inserted: Option<LinkRow> = sqlx::query_as(&sql(
            "INSERT INTO customer_links (user_id, stripe_customer_id, livemode, linked_via, linked_at)
             SELECT $1, $2, $3, $4, {now_ms}
             WHERE EXISTS (SELECT 1 FROM users WHERE id = $1)
               AND NOT EXISTS (SELECT 1 FROM deleted_customers WHERE stripe_customer_id = $2)
             ON CONFLICT DO NOTHING
             RETURNING {link_columns}",
        ))
        .bind(user.as_str())
        .bind(customer.as_str())
        .bind(livemode)
        .bind(via.as_str())
        .clock(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = inserted else {
            tx.rollback().await?;
            return explain_link_conflict(self, user, customer).await;
        };
        let link = link_from_row(row)?;
        let linked = NewAppEvent::customer_linked(user, customer.as_str(), via);
        append(&mut tx, &[linked], now).await?;
        tx.commit().await?;
        self.links.fill(&link, generation);
        Ok(LinkOutcome::Linked(link))
    }

    async fn remove_link(
        &self,
        user: &UserId,
        reason: UnlinkReason,
    ) -> StoreResult<Option<CustomerLink>> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        let row: Option<LinkRow> = sqlx::query_as(&sql(
            "DELETE FROM customer_links WHERE user_id = $1 RETURNING {link_columns}",
        ))
        .bind(user.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let removed = row.map(link_from_row).transpose()?;
        if let Some(link) = &removed {
            let unlinked = NewAppEvent::customer_unlinked(user, link.customer_id.as_str(), reason);
            append(&mut tx, &[unlinked], now).await?;
        }
        tx.commit().await?;
        self.links.evict(user.as_str());
        Ok(removed)
    }

    async fn record_deleted_customer(&self, customer: &str, created: i64) -> StoreResult<()> {
        sqlx::query(&sql(
            "INSERT INTO deleted_customers (stripe_customer_id, deleted_created, recorded_at)
             VALUES ($1, $2, {now})
             ON CONFLICT (stripe_customer_id) DO UPDATE
             SET deleted_created = {greatest}(deleted_customers.deleted_created,
                                              excluded.deleted_created)",
        ))
        .bind(customer)
        .bind(created)
        .clock(Clock::now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn record_push(&self, user: &UserId, pushed: &PushedProfile) -> StoreResult<()> {
        let mut db = self.pool.acquire().await?;
        let stamp = Some(pushed.version);
        record_pushed(&mut db, user, pushed, pushed.version, stamp, Clock::now()).await
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

    async fn raise_link_watermark(
        &self,
        customer: &str,
        created: i64,
        event_id: &str,
    ) -> StoreResult<()> {
        raise_watermark(
            &mut *self.pool.acquire().await?,
            customer,
            created,
            event_id,
        )
        .await
    }
}
