use async_trait::async_trait;

use super::{
    dialect::{db_time, sql, time, Clock, Clocked, Time},
    Backend,
};
use crate::{
    domain::{SubscriptionMirror, UserId},
    store::{items_from_json, items_json, traits::Subscriptions, StoreError, StoreResult},
};

#[async_trait]
impl Subscriptions for Backend {
    async fn list_subscriptions(&self, user: &UserId) -> StoreResult<Vec<SubscriptionMirror>> {
        type Row = (
            String,
            Option<String>,
            String,
            String,
            Option<String>,
            bool,
            Option<Time>,
            Time,
            Option<Time>,
            Option<Time>,
            Option<Time>,
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
        let at = |value: Option<Time>| value.map(time).transpose();
        rows.into_iter()
            .map(|row| {
                Ok(SubscriptionMirror {
                    id: row.0,
                    user_id: row
                        .1
                        .map(|u| UserId::parse(&u))
                        .transpose()
                        .map_err(|e| StoreError::Corrupt(e.message))?,
                    customer_id: row.2,
                    status: row.3,
                    price_id: row.4,
                    cancel_at_period_end: row.5,
                    current_period_end: at(row.6)?,
                    updated_at: time(row.7)?,
                    cancel_at: at(row.8)?,
                    canceled_at: at(row.9)?,
                    ended_at: at(row.10)?,
                    items: items_from_json(&row.11)?,
                })
            })
            .collect()
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
        .bind(sub.current_period_end.map(db_time))
        .bind(created)
        .bind(db_time(sub.updated_at))
        .bind(event_id)
        .bind(sub.cancel_at.map(db_time))
        .bind(sub.canceled_at.map(db_time))
        .bind(sub.ended_at.map(db_time))
        .bind(items_json(&sub.items))
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
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

    async fn cancel_customer_subscriptions(
        &self,
        customer: &str,
        created: i64,
        event_id: &str,
    ) -> StoreResult<u64> {
        Ok(sqlx::query(&sql(
            "UPDATE subscriptions SET status = 'canceled', cancel_at_period_end = TRUE,
                    updated_at = {now},
                    event_watermark_id = CASE WHEN event_watermark IS NULL OR event_watermark <= $2
                                              THEN $3 ELSE event_watermark_id END,
                    event_watermark = {greatest}(COALESCE(event_watermark, $2), $2)
             WHERE stripe_customer_id = $1",
        ))
        .bind(customer)
        .bind(created)
        .bind(event_id)
        .clock(Clock::now())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}
