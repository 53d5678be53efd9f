use std::time::Duration;

use async_trait::async_trait;

use super::{
    dialect::{begin_write, ids, span, sql, time, Clock, Clocked, Time},
    rows::{link_from_row, LinkRow},
    Backend,
};
use crate::{
    domain::{CustomerLink, ReconcileRunRecord, UserId},
    store::{parse_json, traits::ReconcileRuns, StoreResult},
};

/// Why a run whose lease ran out ended: stored when the lapse is found, and said when it is
/// read before then.
const INTERRUPTED: &str = "the process running it stopped before it finished";

type RunRow = (
    String,
    bool,
    String,
    String,
    Option<String>,
    Option<String>,
    Time,
    Option<Time>,
    bool,
);

#[async_trait]
impl ReconcileRuns for Backend {
    async fn start_reconcile_run(
        &self,
        id: &str,
        apply: bool,
        lease: Duration,
        keep: u32,
    ) -> StoreResult<bool> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        // A live run whose lease ran out: the process running it stopped.
        sqlx::query(&sql(
            "UPDATE reconcile_runs SET status = 'interrupted', finished_at = {now}, error = $1
             WHERE status = 'running' AND lease_until < {now}",
        ))
        .bind(INTERRUPTED)
        .clock(now)
        .execute(&mut *tx)
        .await?;
        let started = sqlx::query(&sql(
            "INSERT INTO reconcile_runs (id, apply, status, progress, started_at, lease_until)
             VALUES ($1, $2, 'running', '{}', {now}, {later $3})
             ON CONFLICT (status) WHERE status = 'running' DO NOTHING",
        ))
        .bind(id)
        .bind(apply)
        .bind(span(lease))
        .clock(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if started {
            sqlx::query(
                "DELETE FROM reconcile_runs WHERE status <> 'running' AND id NOT IN
                    (SELECT id FROM reconcile_runs ORDER BY started_at DESC LIMIT $1)",
            )
            .bind(i64::from(keep))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(started)
    }

    async fn renew_reconcile_run(
        &self,
        id: &str,
        progress: &serde_json::Value,
        lease: Duration,
    ) -> StoreResult<bool> {
        let renewed = sqlx::query(&sql(
            "UPDATE reconcile_runs SET progress = $2, lease_until = {later $3}
             WHERE id = $1 AND status = 'running'",
        ))
        .bind(id)
        .bind(progress.to_string())
        .bind(span(lease))
        .clock(Clock::now())
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn finish_reconcile_run(
        &self,
        id: &str,
        progress: &serde_json::Value,
        outcome: Result<&serde_json::Value, &str>,
    ) -> StoreResult<bool> {
        let (status, report, error) = match outcome {
            Ok(report) => ("done", Some(report.to_string()), None),
            Err(error) => ("failed", None, Some(error)),
        };
        let finished = sqlx::query(&sql(
            "UPDATE reconcile_runs SET status = $2, progress = $3, report = $4, error = $5,
                    finished_at = {now}
             WHERE id = $1 AND status = 'running'",
        ))
        .bind(id)
        .bind(status)
        .bind(progress.to_string())
        .bind(report)
        .bind(error)
        .clock(Clock::now())
        .execute(&self.pool)
        .await?;
        Ok(finished.rows_affected() == 1)
    }

    async fn reconcile_run(&self, id: &str) -> StoreResult<Option<ReconcileRunRecord>> {
        let row: Option<RunRow> = sqlx::query_as(&sql(
            "SELECT id, apply, status, progress, report, error, started_at, finished_at,
                    (status = 'running' AND lease_until < {now})
             FROM reconcile_runs WHERE id = $1",
        ))
        .bind(id)
        .clock(Clock::now())
        .fetch_optional(&self.pool)
        .await?;
        let Some((id, apply, status, progress, report, error, started, finished, lapsed)) = row
        else {
            return Ok(None);
        };
        let (status, error) = if lapsed {
            ("interrupted".to_owned(), Some(INTERRUPTED.to_owned()))
        } else {
            (status, error)
        };
        Ok(Some(ReconcileRunRecord {
            id,
            apply,
            status,
            progress: parse_json(&progress)?,
            report: report.as_deref().map(parse_json).transpose()?,
            error,
            started_at: time(started)?,
            finished_at: finished.map(time).transpose()?,
        }))
    }

    async fn mark_linked_seen(&self, run: &str, customers: &[String]) -> StoreResult<()> {
        sqlx::query(&sql("INSERT INTO reconcile_seen (run_id, customer_id)
             SELECT $1, stripe_customer_id FROM customer_links WHERE stripe_customer_id {in $2}
             ON CONFLICT DO NOTHING"))
        .bind(run)
        .bind(ids(customers))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn links_not_seen(
        &self,
        run: &str,
        after: Option<&UserId>,
        limit: u32,
    ) -> StoreResult<Vec<CustomerLink>> {
        let rows: Vec<LinkRow> = sqlx::query_as(&sql("SELECT {link_columns} FROM customer_links l
             WHERE ($2 IS NULL OR l.user_id > $2)
               AND NOT EXISTS (SELECT 1 FROM reconcile_seen s
                               WHERE s.run_id = $1 AND s.customer_id = l.stripe_customer_id)
             ORDER BY l.user_id LIMIT $3"))
        .bind(run)
        .bind(after.map(UserId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(link_from_row).collect()
    }

    async fn forget_seen(&self, run: &str) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM reconcile_seen WHERE run_id = $1 OR run_id IN
                (SELECT id FROM reconcile_runs WHERE status <> 'running')",
        )
        .bind(run)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn user_and_link_counts(&self) -> StoreResult<(u64, u64)> {
        let (users, links): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM customer_links)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((users.max(0) as u64, links.max(0) as u64))
    }
}
