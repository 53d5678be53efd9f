use async_trait::async_trait;
use sqlx::Row;
use time::OffsetDateTime;

use super::{
    dialect::{begin_write, db_time, ids, span, sql, Clock, Clocked},
    rows::{event_from_row, user_from_row, EventRow, UserRow},
    Backend,
};
use crate::{
    domain::{
        CustomerUpdate, EventOutcome, EventState, EventToApply, NewEvent, StoredEvent,
        UpdateContext,
    },
    store::{clip_error, pushed_profile, traits::EventInbox, StoreResult, DUE_WINDOW_PER_CUSTOMER},
};

/// Storing a batch, reading many customers' queues, committing many customers' updates and
/// finishing applied events are done differently per backend (`Backend::store_events`,
/// `queued_events`, `commit_updates`, `finish_applied`): Postgres in one statement each,
/// SQLite a statement per row.
#[async_trait]
impl EventInbox for Backend {
    async fn insert_events(&self, events: &[NewEvent]) -> StoreResult<Vec<bool>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.store_events(events).await
    }

    async fn list_events(
        &self,
        state: Option<EventState>,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>> {
        // Waiting events are found through the (small) queue, the others by walking the
        // inbox newest first.
        let source = match state {
            Some(EventState::Pending | EventState::Failed) => {
                "(SELECT s.* FROM stripe_event_queue q
                  JOIN stripe_event_states s ON s.id = q.event_id WHERE q.state = $1)"
            }
            _ => "stripe_event_states",
        };
        let rows: Vec<EventRow> = sqlx::query_as(&sql(&format!(
            "SELECT {{event_columns}} FROM {source} AS s WHERE ($1 IS NULL OR state = $1)
             ORDER BY {{seq}} DESC LIMIT $2"
        )))
        .bind(state.map(EventState::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(event_from_row).collect()
    }

    async fn replay_event(&self, id: &str) -> StoreResult<Option<StoredEvent>> {
        let mut tx = begin_write(&self.pool).await?;
        // An event without a customer has nothing to apply it to: it stays as it is.
        let reset = sqlx::query(
            "UPDATE stripe_events SET state = 'pending', attempts = 0, last_error = NULL,
                                      next_attempt_at = NULL, applied_at = NULL
             WHERE id = $1 AND stripe_customer_id IS NOT NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if reset.rows_affected() > 0 {
            sqlx::query(&sql(
                "INSERT INTO stripe_event_queue (event_id, stripe_customer_id, created, {seq},
                                                 received_at)
                 SELECT id, stripe_customer_id, created, {seq}, received_at FROM stripe_events
                 WHERE id = $1
                 ON CONFLICT (event_id) DO UPDATE
                    SET state = 'pending', attempts = 0, next_attempt_at = NULL,
                        last_error = NULL",
            ))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        let row: Option<EventRow> = sqlx::query_as(&sql(
            "SELECT {event_columns} FROM stripe_event_states WHERE id = $1",
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        if reset.rows_affected() == 0 && row.is_some() {
            tracing::info!(event_id = %id, "replay: the event names no customer; nothing to apply");
        }
        row.map(event_from_row).transpose()
    }

    async fn replay_failed_events(&self) -> StoreResult<u64> {
        Ok(sqlx::query(
            "UPDATE stripe_event_queue SET state = 'pending', attempts = 0, next_attempt_at = NULL,
                    last_error = NULL WHERE state = 'failed'",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn prune_events(&self, cutoff: OffsetDateTime) -> StoreResult<u64> {
        let mut tx = begin_write(&self.pool).await?;
        // Events parked as failed go after the retention too.
        sqlx::query(
            "DELETE FROM stripe_event_queue
             WHERE state = 'failed' AND next_attempt_at IS NULL AND received_at < $1",
        )
        .bind(db_time(cutoff))
        .execute(&mut *tx)
        .await?;
        let pruned = sqlx::query(
            "DELETE FROM stripe_events WHERE received_at < $1
                AND NOT EXISTS (SELECT 1 FROM stripe_event_queue q
                                WHERE q.event_id = stripe_events.id)",
        )
        .bind(db_time(cutoff))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(pruned)
    }

    async fn due_event_customers(&self, limit: u32) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(&sql("WITH due AS (
                 SELECT * FROM (SELECT stripe_customer_id, {seq} AS seq FROM stripe_event_queue
                                WHERE state = 'pending' ORDER BY {seq} LIMIT $2) AS pending
                 UNION ALL
                 SELECT * FROM (SELECT stripe_customer_id, {seq} AS seq FROM stripe_event_queue
                                WHERE state = 'failed' AND next_attempt_at <= {now}
                                ORDER BY {seq} LIMIT $2) AS retrying
             )
             SELECT stripe_customer_id FROM due
             WHERE NOT EXISTS (
                 SELECT 1 FROM stripe_event_queue waiting
                 WHERE waiting.stripe_customer_id = due.stripe_customer_id
                   AND waiting.state = 'failed' AND waiting.next_attempt_at > {now})
             GROUP BY stripe_customer_id
             ORDER BY min(seq)
             LIMIT $1"))
        .bind(i64::from(limit))
        .bind(i64::from(limit) * DUE_WINDOW_PER_CUSTOMER)
        .clock(Clock::now())
        .fetch_all(&self.pool)
        .await?)
    }

    async fn customers_events(
        &self,
        customers: &[String],
        limit: u32,
    ) -> StoreResult<Vec<(String, Vec<EventToApply>)>> {
        self.queued_events(customers, limit).await
    }

    async fn update_contexts(&self, customers: &[String]) -> StoreResult<Vec<UpdateContext>> {
        let rows = sqlx::query(&sql(
            "SELECT {user_columns_qualified}, l.stripe_customer_id, l.event_watermark,
                    l.event_watermark_id, l.pushed_email, l.pushed_name, l.pushed_phone,
                    l.pushed_version, l.pushed_stamp,
                    EXISTS (SELECT 1 FROM outbox o WHERE o.user_id = l.user_id
                              AND o.kind = 'push_profile' AND o.state IN ('pending', 'in_flight'))
             FROM customer_links l JOIN users ON users.id = l.user_id
             WHERE l.stripe_customer_id {in $1}",
        ))
        .bind(ids(customers))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                // The user's columns first, as `user_from_row` reads them; then the link's.
                let user: UserRow = sqlx::FromRow::from_row(row)?;
                let watermark: Option<i64> = row.try_get(11)?;
                Ok(UpdateContext {
                    customer_id: row.try_get(10)?,
                    user: user_from_row(user)?,
                    watermark: watermark
                        .map(|created| Ok::<_, sqlx::Error>((created, row.try_get(12)?)))
                        .transpose()?,
                    last_push: pushed_profile(
                        row.try_get(13)?,
                        row.try_get(14)?,
                        row.try_get(15)?,
                        row.try_get(16)?,
                    ),
                    pushed_stamp: row.try_get(17)?,
                    active_push: row.try_get(18)?,
                })
            })
            .collect()
    }

    async fn commit_customer_updates(
        &self,
        updates: &[CustomerUpdate],
    ) -> StoreResult<Vec<String>> {
        self.commit_updates(updates).await
    }

    async fn finish_events(&self, events: &[String], outcome: &EventOutcome) -> StoreResult<()> {
        let now = Clock::now();
        match outcome {
            // The event row is rewritten only for an event that failed before, to keep its
            // attempt count; the common case deletes queue rows and nothing else.
            EventOutcome::Applied => {
                let mut tx = begin_write(&self.pool).await?;
                Backend::finish_applied(&mut tx, events, now).await?;
                tx.commit().await?;
            }
            EventOutcome::Retry { delay, error } => {
                sqlx::query(&sql(
                    "UPDATE stripe_event_queue SET state = 'failed', attempts = attempts + 1,
                            last_error = $2, next_attempt_at = {later $3}
                     WHERE event_id {in $1}",
                ))
                .bind(ids(events))
                .bind(clip_error(error))
                .bind(span(*delay))
                .clock(now)
                .execute(&self.pool)
                .await?;
            }
            EventOutcome::Failed { error } => {
                sqlx::query(&sql(
                    "UPDATE stripe_event_queue SET state = 'failed', attempts = attempts + 1,
                            last_error = $2, next_attempt_at = NULL
                     WHERE event_id {in $1}",
                ))
                .bind(ids(events))
                .bind(clip_error(error))
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }
}
