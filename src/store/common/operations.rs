use async_trait::async_trait;

use super::{
    dialect::{self, time, Time},
    Backend,
};
use crate::store::{traits::Operations, QueueStats, StoreError, StoreResult};

#[async_trait]
impl Operations for Backend {
    fn backend(&self) -> &'static str {
        dialect::BACKEND
    }

    async fn migrate(&self) -> StoreResult<()> {
        dialect::migrator()
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

    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        let row: (i64, Option<Time>, i64, i64, Option<Time>, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox WHERE state IN ('pending', 'in_flight')),
                    (SELECT min(created_at) FROM outbox WHERE state = 'pending'),
                    (SELECT count(*) FROM outbox WHERE state = 'failed'),
                    (SELECT count(*) FROM stripe_event_queue WHERE state = 'pending'),
                    (SELECT min(received_at) FROM stripe_event_queue WHERE state = 'pending'),
                    (SELECT count(*) FROM stripe_event_queue WHERE state = 'failed')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(QueueStats {
            outbox_depth: row.0,
            outbox_oldest_pending: row.1.map(time).transpose()?,
            outbox_failed: row.2,
            events_pending: row.3,
            events_oldest_pending: row.4.map(time).transpose()?,
            events_failed: row.5,
        })
    }

    async fn setting_or_init(&self, name: &str, value: &str) -> StoreResult<String> {
        // The first writer's value stays; everyone reads what it wrote.
        sqlx::query(
            "INSERT INTO billsync_settings (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM billsync_settings WHERE name = $1")
                .bind(name)
                .fetch_one(&self.pool)
                .await?,
        )
    }
}
