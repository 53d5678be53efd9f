use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    app_events::append,
    dialect::{begin_write, erasure_gate, span, sql, time, Clock, Clocked, Time},
    rows::{job_from_row, JobRow},
    Backend,
};
use crate::{
    domain::{AuditEntry, Erased, NewAppEvent, OutboxJob, UserId},
    store::{parse_json, traits::Erasure, StoreError, StoreResult},
};

/// How long a new erasure job waits before workers may take it (its caller runs it first).
const ERASE_HEADSTART: Duration = Duration::from_secs(30);

#[async_trait]
impl Erasure for Backend {
    async fn enqueue_erase(
        &self,
        user: &UserId,
        payload: &serde_json::Value,
    ) -> StoreResult<OutboxJob> {
        let row: Option<JobRow> = sqlx::query_as(&sql(
            "INSERT INTO outbox (kind, user_id, payload, state, attempts, next_attempt_at,
                                 created_at, updated_at)
             VALUES ('erase', $1, $2, 'pending', 0, {later $3}, {now}, {now})
             ON CONFLICT (user_id) WHERE kind = 'erase' AND state IN ('pending', 'in_flight')
             DO NOTHING
             RETURNING {job_columns}",
        ))
        .bind(user.as_str())
        .bind(payload.to_string())
        .bind(span(ERASE_HEADSTART))
        .clock(Clock::now())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => job_from_row(row),
            None => self
                .active_erase(user)
                .await?
                .ok_or_else(|| StoreError::Corrupt("erase job vanished".into())),
        }
    }

    async fn active_erase(&self, user: &UserId) -> StoreResult<Option<OutboxJob>> {
        let row: Option<JobRow> = sqlx::query_as(&sql("SELECT {job_columns} FROM outbox
             WHERE user_id = $1 AND kind = 'erase' AND state IN ('pending', 'in_flight')"))
        .bind(user.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(job_from_row).transpose()
    }

    async fn erase_user(
        &self,
        user: &UserId,
        handled_customer: Option<&str>,
        subject_hash: &str,
        audit_detail: &serde_json::Value,
    ) -> StoreResult<Erased> {
        let mut tx = begin_write(&self.pool).await?;
        // The row lock (on SQLite, the write lock) keeps a link from being made until this
        // transaction ends (it then finds no user); a link made before it is seen here.
        let linked: Option<Option<String>> =
            sqlx::query_scalar(&sql("SELECT l.stripe_customer_id FROM users u
             LEFT JOIN customer_links l ON l.user_id = u.id
             WHERE u.id = $1 {for_update}"))
            .bind(user.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(customer) = linked
            .flatten()
            .filter(|c| Some(c.as_str()) != handled_customer)
        {
            tx.rollback().await?;
            return Ok(Erased::Relinked(customer));
        }
        // The customer's stored webhook payloads (email, name, phone, address) go too.
        if let Some(customer) = handled_customer {
            for table in ["stripe_event_queue", "stripe_events"] {
                sqlx::query(&format!(
                    "DELETE FROM {table} WHERE stripe_customer_id = $1"
                ))
                .bind(customer)
                .execute(&mut *tx)
                .await?;
            }
        }
        let existed = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(user.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        sqlx::query(
            "DELETE FROM outbox WHERE user_id = $1 AND kind = 'push_profile'
                                  AND state IN ('pending', 'failed')",
        )
        .bind(user.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE outbox SET user_id = 'erased:' || $2, last_error = NULL WHERE user_id = $1",
        )
        .bind(user.as_str())
        .bind(subject_hash)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&sql(
            "INSERT INTO audit_log (at, actor, action, subject_hash, detail)
             VALUES ({now}, 'billsync', 'account_erased', $1, $2)",
        ))
        .bind(subject_hash)
        .bind(audit_detail.to_string())
        .clock(Clock::now())
        .execute(&mut *tx)
        .await?;
        // The person's app events hold their data: gone with them, delivered or not. The app
        // hears `user.erased`, which names them only by the keyed hash.
        sqlx::query("DELETE FROM app_events WHERE event_key = $1")
            .bind(user.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM app_event_heads WHERE event_key = $1")
            .bind(user.as_str())
            .execute(&mut *tx)
            .await?;
        append(
            &mut tx,
            &[NewAppEvent::user_erased(subject_hash)],
            Clock::now(),
        )
        .await?;
        tx.commit().await?;
        self.links.evict(user.as_str());
        Ok(Erased::Done(existed))
    }

    async fn append_audit(
        &self,
        actor: &str,
        action: &str,
        subject_hash: Option<&str>,
        detail: &serde_json::Value,
    ) -> StoreResult<()> {
        sqlx::query(&sql(
            "INSERT INTO audit_log (at, actor, action, subject_hash, detail)
             VALUES ({now}, $1, $2, $3, $4)",
        ))
        .bind(actor)
        .bind(action)
        .bind(subject_hash)
        .bind(detail.to_string())
        .clock(Clock::now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn audit_for_subject(&self, subject_hash: &str) -> StoreResult<Vec<AuditEntry>> {
        let rows: Vec<(Time, String, String, String)> = sqlx::query_as(
            "SELECT at, actor, action, detail FROM audit_log WHERE subject_hash = $1 ORDER BY id",
        )
        .bind(subject_hash)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(at, actor, action, detail)| {
                Ok(AuditEntry {
                    at: time(at)?,
                    actor,
                    action,
                    detail: parse_json(&detail)?,
                })
            })
            .collect()
    }

    async fn record_tombstone(&self, subject: &str) -> StoreResult<()> {
        let mut tx = begin_write(&self.pool).await?;
        // Not while an import batch that could not see this tombstone is writing users.
        erasure_gate(&mut tx, true).await?;
        sqlx::query(&sql(
            "INSERT INTO erasure_tombstones (subject, erased_at) VALUES ($1, {now})
             ON CONFLICT (subject) DO UPDATE SET erased_at = excluded.erased_at",
        ))
        .bind(subject)
        .clock(Clock::now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn tombstone(&self, subject: &str) -> StoreResult<Option<OffsetDateTime>> {
        let at: Option<Time> =
            sqlx::query_scalar("SELECT erased_at FROM erasure_tombstones WHERE subject = $1")
                .bind(subject)
                .fetch_optional(&self.pool)
                .await?;
        at.map(time).transpose()
    }

    async fn customer_events_page(
        &self,
        customer: &str,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT id, payload FROM stripe_events
             WHERE stripe_customer_id = $1 AND ($2 IS NULL OR id > $2)
             ORDER BY id LIMIT $3",
        )
        .bind(customer)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }
}
