//! The worker: claims due jobs from the database (several instances share the work), runs
//! each with the handler registered for its kind, applies the shared retry policy (see
//! `retry`), and finishes the job under its claim's fencing token, so a worker whose claim
//! was lost drops its result instead of overwriting the new claimant's.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    config::OutboxConfig,
    retry::{Decision, JobFailure, RetryPolicy},
    store::{JobKind, JobOutcome, OutboxJob, Store, StoreError},
};

/// What the worker runs for a claimed job of one kind. An attempt either finishes the job or
/// says why not; retrying, parking and recording are the worker's.
#[async_trait::async_trait]
pub trait JobHandler: Send + Sync {
    async fn run(&self, job: &OutboxJob) -> Result<(), JobFailure>;
}

#[derive(Clone)]
pub struct Worker {
    store: Arc<dyn Store>,
    config: OutboxConfig,
    retry: RetryPolicy,
    /// Looked up by kind: a handful of them, and `JobKind` is neither `Hash` nor `Ord`.
    handlers: Vec<(JobKind, Arc<dyn JobHandler>)>,
}

impl Worker {
    pub fn new(store: Arc<dyn Store>, config: OutboxConfig) -> Self {
        Self {
            retry: RetryPolicy::from(&config),
            store,
            config,
            handlers: Vec::new(),
        }
    }

    /// Runs `kind`'s jobs with `handler` (in place of one registered before).
    pub fn register(mut self, kind: JobKind, handler: Arc<dyn JobHandler>) -> Self {
        self.handlers.retain(|(registered, _)| *registered != kind);
        self.handlers.push((kind, handler));
        self
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// How long a claim protects a job from other workers.
    pub fn lease(&self) -> Duration {
        self.config.lease
    }

    /// Runs until `shutdown` turns true; the job in hand is finished first.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!("outbox worker started");
        loop {
            if *shutdown.borrow() {
                break;
            }
            let handled = match self.tick().await {
                Ok(handled) => handled,
                Err(err) => {
                    tracing::warn!(error = %err, "outbox worker cannot reach the database");
                    0
                }
            };
            if handled == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(self.config.poll_interval) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
        tracing::info!("outbox worker stopped");
    }

    /// Claims and runs one batch of due jobs; returns how many it ran.
    pub async fn tick(&self) -> Result<usize, StoreError> {
        let jobs = self
            .store
            .claim_jobs(self.config.batch, self.config.lease)
            .await?;
        let count = jobs.len();
        for job in jobs {
            let outcome = self.run_job(&job).await;
            self.finish(&job, &outcome).await?;
        }
        Ok(count)
    }

    /// Records how a claimed job ended; a worker whose claim was lost (its lease ran out and
    /// another worker took the job) drops its result. Returns whether it was recorded.
    pub async fn finish(&self, job: &OutboxJob, outcome: &JobOutcome) -> Result<bool, StoreError> {
        let recorded = self.store.finish_job(job, outcome).await?;
        if !recorded {
            tracing::warn!(
                job_id = job.id,
                "job claim lost to another worker; its result is dropped"
            );
        }
        Ok(recorded)
    }

    /// Runs one claimed job and says how it ended.
    #[tracing::instrument(skip_all, fields(job_id = job.id, kind = job.kind.as_str(), attempt = job.attempts))]
    pub async fn run_job(&self, job: &OutboxJob) -> JobOutcome {
        let handler = self
            .handlers
            .iter()
            .find(|(kind, _)| *kind == job.kind)
            .map(|(_, handler)| handler);
        let result = match handler {
            Some(handler) => handler.run(job).await,
            // A worker assembled without this kind (see `OutboxWorker` for all of them).
            None => Err(JobFailure::Permanent(format!(
                "no handler registered for {} jobs",
                job.kind.as_str()
            ))),
        };
        let outcome = match result {
            Ok(()) => JobOutcome::Done,
            Err(failure) => outcome_of(&self.retry, job.attempts, failure),
        };
        let label = match outcome {
            JobOutcome::Done => "done",
            JobOutcome::Retry { .. } => "retry",
            JobOutcome::Failed { .. } => "failed",
        };
        metrics::counter!("billsync_outbox_jobs_total",
            "kind" => job.kind.as_str(), "outcome" => label)
        .increment(1);
        outcome
    }
}

/// How a job whose claim has made `attempts` attempts (this one included) ends after
/// `failure`: retried after the backoff, or parked as failed with the reason.
fn outcome_of(retry: &RetryPolicy, attempts: i32, failure: JobFailure) -> JobOutcome {
    let attempts = u32::try_from(attempts.max(1)).unwrap_or(u32::MAX);
    match retry.decide(attempts, failure) {
        Decision::Retry { delay, error } => {
            tracing::info!(%error, delay_ms = delay.as_millis() as u64, "job will be retried");
            JobOutcome::Retry { delay, error }
        }
        Decision::Exhausted { error } => {
            tracing::warn!(%error, attempts, "job failed after its last attempt");
            JobOutcome::Failed {
                error: format!("gave up after {attempts} attempts: {error}"),
            }
        }
        Decision::Permanent { error } => {
            tracing::warn!(%error, "job failed permanently");
            JobOutcome::Failed { error }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_attempt_is_retried_until_the_last_then_parked() {
        let retry = RetryPolicy::three_attempts();
        let unavailable = || JobFailure::Transient {
            error: "Stripe is unavailable".into(),
            retry_after: None,
        };
        let refused = || JobFailure::Permanent("No such customer".into());
        let failed = |error: &str| {
            Some(JobOutcome::Failed {
                error: error.to_owned(),
            })
        };
        // (the claimed job's attempts, the failure, the outcome; `None`: retried)
        type Case = (i32, fn() -> JobFailure, Option<JobOutcome>);
        let cases: [Case; 6] = [
            // A job run without a claim (its attempts not counted yet) is on its first.
            (0, unavailable, None),
            (1, unavailable, None),
            (2, unavailable, None),
            (
                3,
                unavailable,
                failed("gave up after 3 attempts: Stripe is unavailable"),
            ),
            (1, refused, failed("No such customer")),
            (3, refused, failed("No such customer")),
        ];
        for (attempts, failure, expected) in cases {
            match (outcome_of(&retry, attempts, failure()), expected) {
                (JobOutcome::Retry { error, .. }, None) => {
                    assert_eq!(error, "Stripe is unavailable", "attempts {attempts}")
                }
                (outcome, expected) => assert_eq!(Some(outcome), expected, "attempts {attempts}"),
            }
        }
    }
}
