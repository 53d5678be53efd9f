use std::time::Duration;

use async_trait::async_trait;

use super::{
    app_events::append,
    dialect::{begin_write, span, sql, Clock, Clocked, Db},
    rows::{job_from_row, JobRow},
    Backend,
};
use crate::{
    domain::{JobOutcome, JobState, NewAppEvent, OutboxJob, UserId},
    store::{clip_error, traits::OutboxJobs, StoreResult},
};

/// A claiming statement, for the backend's `claim` to run: it returns the claimed rows.
pub(crate) type JobClaim<'q> =
    sqlx::query::QueryAs<'q, Db, JobRow, <Db as sqlx::Database>::Arguments<'q>>;

/// Claiming (`Backend::CLAIM_DUE_JOBS`, `Backend::claim`) and ending a claim
/// (`Backend::claim_ended`) are the backend's: Postgres also holds a session lock per
/// claimed job, so another instance takes it over as soon as its holder dies.
#[async_trait]
impl OutboxJobs for Backend {
    async fn claim_jobs(&self, limit: u32, lease: Duration) -> StoreResult<Vec<OutboxJob>> {
        let statement = sql(Backend::CLAIM_DUE_JOBS);
        let claim = sqlx::query_as(&statement)
            .bind(i64::from(limit))
            .bind(span(lease))
            .clock(Clock::now());
        let mut jobs = self.claim(claim).await?;
        jobs.sort_by_key(|j| (j.next_attempt_at, j.id));
        Ok(jobs)
    }

    async fn claim_job(&self, id: i64, lease: Duration) -> StoreResult<Option<OutboxJob>> {
        let statement = sql(
            "UPDATE outbox SET state = 'in_flight', attempts = attempts + 1,
                    claim_token = {new_token}, locked_until = {later $2}, updated_at = {now}
             WHERE id = $1 AND state = 'pending'
               AND NOT EXISTS (SELECT 1 FROM outbox b
                               WHERE b.user_id = outbox.user_id AND b.state = 'in_flight')
             RETURNING {job_columns}",
        );
        let claim = sqlx::query_as(&statement)
            .bind(id)
            .bind(span(lease))
            .clock(Clock::now());
        Ok(self.claim(claim).await?.pop())
    }

    async fn finish_job(&self, job: &OutboxJob, outcome: &JobOutcome) -> StoreResult<bool> {
        let Some(token) = job.claim_token.as_deref() else {
            return Ok(false);
        };
        let statement = sql(match outcome {
            JobOutcome::Done => {
                "UPDATE outbox SET state = 'done', locked_until = NULL, last_error = NULL,
                        updated_at = {now}
                 WHERE id = $1 AND claim_token = $2 AND state = 'in_flight'"
            }
            JobOutcome::Failed { .. } => {
                "UPDATE outbox SET state = 'failed', locked_until = NULL, last_error = $3,
                        updated_at = {now}
                 WHERE id = $1 AND claim_token = $2 AND state = 'in_flight'"
            }
            JobOutcome::Retry { .. } => {
                "UPDATE outbox SET state = CASE WHEN {superseded} THEN 'done' ELSE 'pending' END,
                        next_attempt_at = {later $4}, locked_until = NULL, last_error = $3,
                        updated_at = {now}
                 WHERE id = $1 AND claim_token = $2 AND state = 'in_flight'"
            }
        });
        let query = sqlx::query(&statement).bind(job.id).bind(token);
        let query = match outcome {
            JobOutcome::Done => query,
            JobOutcome::Failed { error } => query.bind(clip_error(error)),
            JobOutcome::Retry { delay, error } => query.bind(clip_error(error)).bind(span(*delay)),
        };
        let now = Clock::now();
        let finished = async {
            let mut tx = begin_write(&self.pool).await?;
            let finished = query.clock(now).execute(&mut *tx).await?.rows_affected() > 0;
            if let (true, JobOutcome::Failed { error }) = (finished, outcome) {
                append(&mut tx, &[NewAppEvent::sync_failed(job, error)], now).await?;
            }
            tx.commit().await?;
            StoreResult::Ok(finished)
        }
        .await;
        // The claim ends either way (a refused finish means it was lost).
        self.claim_ended(job.id, token).await;
        finished
    }

    async fn save_job_payload(
        &self,
        job: &OutboxJob,
        payload: &serde_json::Value,
    ) -> StoreResult<bool> {
        let Some(token) = job.claim_token.as_deref() else {
            return Ok(false);
        };
        Ok(
            sqlx::query(&sql("UPDATE outbox SET payload = $3, updated_at = {now}
             WHERE id = $1 AND claim_token = $2 AND state = 'in_flight'"))
            .bind(job.id)
            .bind(token)
            .bind(payload.to_string())
            .clock(Clock::now())
            .execute(&self.pool)
            .await?
            .rows_affected()
                > 0,
        )
    }

    async fn get_job(&self, id: i64) -> StoreResult<Option<OutboxJob>> {
        let row: Option<JobRow> =
            sqlx::query_as(&sql("SELECT {job_columns} FROM outbox WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(job_from_row).transpose()
    }

    async fn list_jobs(&self, state: Option<JobState>, limit: u32) -> StoreResult<Vec<OutboxJob>> {
        let rows: Vec<JobRow> = sqlx::query_as(&sql(
            "SELECT {job_columns} FROM outbox WHERE ($1 IS NULL OR state = $1)
             ORDER BY id DESC LIMIT $2",
        ))
        .bind(state.map(JobState::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(job_from_row).collect()
    }

    async fn user_jobs(&self, user: &UserId) -> StoreResult<Vec<OutboxJob>> {
        let rows: Vec<JobRow> = sqlx::query_as(&sql(
            "SELECT {job_columns} FROM outbox WHERE user_id = $1 ORDER BY id",
        ))
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(job_from_row).collect()
    }

    async fn retry_job(&self, id: i64) -> StoreResult<Option<OutboxJob>> {
        let row: Option<JobRow> = sqlx::query_as(&sql(
            "UPDATE outbox SET state = CASE WHEN {superseded} THEN 'done' ELSE 'pending' END,
                    attempts = 0, next_attempt_at = {now}, locked_until = NULL,
                    last_error = NULL, updated_at = {now}
             WHERE id = $1 AND state = 'failed'
             RETURNING {job_columns}",
        ))
        .bind(id)
        .clock(Clock::now())
        .fetch_optional(&self.pool)
        .await?;
        row.map(job_from_row).transpose()
    }
}
