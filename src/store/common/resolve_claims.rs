use std::time::Duration;

use async_trait::async_trait;

use super::{
    dialect::{span, sql, time, Clock, Clocked, Time},
    Backend,
};
use crate::{
    domain::{ResolveClaim, UserId},
    store::{traits::ResolveClaims, StoreResult},
};

#[async_trait]
impl ResolveClaims for Backend {
    async fn try_claim_resolve(
        &self,
        user: &UserId,
        holder: &str,
        lease: Duration,
    ) -> StoreResult<Option<ResolveClaim>> {
        let claim: Option<(Time, Option<String>)> = sqlx::query_as(&sql(
            "INSERT INTO customer_resolve_claims (user_id, holder, started_at, lease_until)
             VALUES ($1, $2, {now_ms}, {later $3})
             ON CONFLICT (user_id) DO UPDATE
                SET holder = excluded.holder, lease_until = excluded.lease_until
                WHERE customer_resolve_claims.lease_until <= {now}
             RETURNING started_at, create_params",
        ))
        .bind(user.as_str())
        .bind(holder)
        .bind(span(lease))
        .clock(Clock::now())
        .fetch_optional(&self.pool)
        .await?;
        claim
            .map(|(started_at, create_params)| {
                Ok(ResolveClaim {
                    started_at: time(started_at)?,
                    create_params,
                })
            })
            .transpose()
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
        if completed {
            sqlx::query("DELETE FROM customer_resolve_claims WHERE user_id = $1 AND holder = $2")
                .bind(user.as_str())
                .bind(holder)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query(&sql(
                "UPDATE customer_resolve_claims SET lease_until = {now}
                              WHERE user_id = $1 AND holder = $2",
            ))
            .bind(user.as_str())
            .bind(holder)
            .clock(Clock::now())
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }
}
