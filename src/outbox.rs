//! The outbox worker: durable jobs towards Stripe (profile pushes, erasure sagas), claimed from
//! the database so several instances share the work, retried with exponential backoff and
//! jitter (honouring `Retry-After`), parked as `failed` after the configured attempts.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;

use crate::{
    config::OutboxConfig,
    domain::{full_name, UserId},
    gdpr,
    store::{JobKind, JobOutcome, JobState, OutboxJob, PushedProfile, Store, StoreError},
    stripe::{CustomerParams, StripeClient, StripeError, METADATA_PROFILE_VERSION},
};

#[derive(Clone)]
pub struct OutboxWorker {
    store: Arc<dyn Store>,
    stripe: StripeClient,
    config: OutboxConfig,
    tombstones: Arc<gdpr::Tombstones>,
}

impl OutboxWorker {
    pub fn new(store: Arc<dyn Store>, stripe: StripeClient, config: OutboxConfig) -> Self {
        Self {
            store,
            stripe,
            config,
            tombstones: Arc::new(gdpr::Tombstones::new(None)),
        }
    }

    /// Keys the erasure tombstones with `pepper` (`BILLSYNC_ERASURE_PEPPER`) instead of the
    /// one kept in the database.
    pub fn with_erasure_pepper(mut self, pepper: Option<crate::config::Secret>) -> Self {
        self.tombstones = Arc::new(gdpr::Tombstones::new(pepper));
        self
    }

    /// The tombstones the erasures write, for the user routes to check tokens against.
    pub fn tombstones(&self) -> &gdpr::Tombstones {
        &self.tombstones
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
    async fn finish(&self, job: &OutboxJob, outcome: &JobOutcome) -> Result<bool, StoreError> {
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
        let result = match job.kind {
            JobKind::PushProfile => self.push_profile(job).await,
            JobKind::Erase => {
                gdpr::run_erasure(self.store.as_ref(), &self.stripe, &self.tombstones, job).await
            }
        };
        let outcome = match result {
            Ok(()) => JobOutcome::Done,
            Err(failure) => self.outcome_of(job, failure),
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

    fn outcome_of(&self, job: &OutboxJob, failure: JobFailure) -> JobOutcome {
        let attempts = u32::try_from(job.attempts.max(1)).unwrap_or(u32::MAX);
        match failure {
            JobFailure::Transient { error, retry_after } if attempts < self.config.max_attempts => {
                let delay = backoff(&self.config, attempts, retry_after);
                tracing::info!(%error, delay_ms = delay.as_millis() as u64, "job will be retried");
                JobOutcome::Retry { delay, error }
            }
            JobFailure::Transient { error, .. } => {
                tracing::warn!(%error, attempts, "job failed after its last attempt");
                JobOutcome::Failed {
                    error: format!("gave up after {attempts} attempts: {error}"),
                }
            }
            JobFailure::Permanent(error) => {
                tracing::warn!(%error, "job failed permanently");
                JobOutcome::Failed { error }
            }
        }
    }

    /// Pushes the user's *current* email, name and phone: a job that runs late still sends
    /// the newest values, and a burst of edits collapses into one push.
    async fn push_profile(&self, job: &OutboxJob) -> Result<(), JobFailure> {
        let Ok(user_id) = UserId::parse(&job.user_id) else {
            return Ok(());
        };
        let Some(user) = self.store.get_user(&user_id).await? else {
            return Ok(()); // erased since: nothing to push
        };
        let Some(link) = self.store.get_link(&user_id).await? else {
            return Ok(()); // no customer yet: it will be created with these values
        };
        let name = full_name(user.first_name.as_ref(), user.last_name.as_ref());
        let phone = user.phone.as_ref().map(ToString::to_string);
        let now = time::OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .expect("UTC formats as RFC 3339");
        let params = CustomerParams {
            email: Some(user.email.to_string()),
            // An empty value clears the field in Stripe.
            name: Some(name.clone().unwrap_or_default()),
            phone: Some(phone.clone().unwrap_or_default()),
            metadata: BTreeMap::from([
                ("last_profile_sync".to_owned(), now),
                ("synced_from".to_owned(), "billsync".to_owned()),
                // Which local version these values are: the echo of this push, however
                // late, is recognised as billsync's own (see `webhooks::apply`).
                (
                    METADATA_PROFILE_VERSION.to_owned(),
                    user.version.to_string(),
                ),
            ]),
        };
        // One key per claim: the client's own retries of this request reuse it, but a new
        // attempt (a reclaim, an operator's retry) never sends an old key with a new body.
        // An erasure started since: no push may reach Stripe after its scrub (and while this
        // job is in flight, the erasure waits for it).
        if self.store.active_erase(&user_id).await?.is_some() {
            tracing::info!("erasure under way: push dropped");
            return Ok(());
        }
        let key = format!(
            "billsync-push-{}-{}",
            job.id,
            job.claim_token.as_deref().unwrap_or("unclaimed")
        );
        self.stripe
            .update_customer(link.customer_id.as_str(), &params, Some(&key))
            .await?;
        self.store
            .record_push(
                &user_id,
                &PushedProfile {
                    email: user.email.to_string(),
                    name,
                    phone,
                    version: user.version,
                },
            )
            .await?;
        tracing::info!(customer_id = %link.customer_id, version = user.version, "profile pushed");
        Ok(())
    }
}

/// Why a job attempt did not finish.
#[derive(Debug)]
pub enum JobFailure {
    /// Worth retrying: Stripe or the database is unavailable.
    Transient {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Retrying will not help (Stripe refused the request): parked for an operator.
    Permanent(String),
}

impl From<StripeError> for JobFailure {
    fn from(err: StripeError) -> Self {
        if err.is_unavailable() {
            Self::Transient {
                retry_after: err.retry_after(),
                error: err.to_string(),
            }
        } else {
            Self::Permanent(err.to_string())
        }
    }
}

impl From<StoreError> for JobFailure {
    fn from(err: StoreError) -> Self {
        Self::Transient {
            error: err.to_string(),
            retry_after: None,
        }
    }
}

/// `base * 2^(attempt-1)`, capped, with jitter over its upper half; never shorter than the
/// server's `Retry-After`.
pub fn backoff(config: &OutboxConfig, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let exponential = config
        .backoff_base
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(config.backoff_max);
    exponential
        .mul_f64(0.5 + fastrand::f64() * 0.5)
        .max(retry_after.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_honours_retry_after() {
        let config = crate::config::Config::load(&Default::default())
            .unwrap()
            .outbox;
        let mut previous_ceiling = Duration::ZERO;
        for attempt in 1..=12 {
            let ceiling = config
                .backoff_base
                .saturating_mul(2u32.pow(attempt - 1))
                .min(config.backoff_max);
            let delay = backoff(&config, attempt, None);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "attempt {attempt}: {delay:?}"
            );
            assert!(ceiling >= previous_ceiling);
            previous_ceiling = ceiling;
        }
        assert_eq!(previous_ceiling, config.backoff_max);
        assert!(backoff(&config, 1, Some(Duration::from_secs(30))) >= Duration::from_secs(30));
    }
}

/// How long an erasure request waits for the user's in-flight push before answering pending.
const ERASE_WAIT: Duration = Duration::from_secs(10);

/// What an erasure request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErasureStatus {
    /// Everything is gone (or was already).
    Completed,
    /// A Stripe step failed; the saga is queued and will be retried.
    Pending,
}

impl OutboxWorker {
    /// Starts (or joins) the user's erasure and runs it now if no worker holds it. Safe to
    /// repeat: a second request joins the first saga, and an erased user is simply gone.
    #[tracing::instrument(skip_all, fields(subject = %gdpr::subject_hash(user_id)))]
    pub async fn erase_now(
        &self,
        user_id: &UserId,
        delete_customer: bool,
    ) -> Result<ErasureStatus, StoreError> {
        let active = self.store.active_erase(user_id).await?;
        if active.is_none() && self.store.get_user(user_id).await?.is_none() {
            return Ok(ErasureStatus::Completed);
        }
        let job = match active {
            Some(job) => job,
            None => {
                let plan = gdpr::ErasurePlan {
                    customer_id: self
                        .store
                        .get_link(user_id)
                        .await?
                        .map(|l| l.customer_id.to_string()),
                    delete_customer,
                    ..Default::default()
                };
                let payload = serde_json::to_value(&plan).expect("plans serialize");
                self.store.enqueue_erase(user_id, &payload).await?
            }
        };
        // Exclusive per user: the claim waits while a push of theirs is in flight (it lands
        // before the scrub, never after), briefly; past that the saga is left to the workers.
        let deadline = tokio::time::Instant::now() + ERASE_WAIT;
        let claimed = loop {
            if let Some(claimed) = self.store.claim_job(job.id, self.config.lease).await? {
                break claimed;
            }
            let still_pending = self
                .store
                .get_job(job.id)
                .await?
                .is_some_and(|j| j.state == JobState::Pending);
            if !still_pending || tokio::time::Instant::now() >= deadline {
                return Ok(ErasureStatus::Pending); // another worker is on it, or a push is
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let outcome = self.run_job(&claimed).await;
        let recorded = self.finish(&claimed, &outcome).await?;
        Ok(match outcome {
            JobOutcome::Done if recorded => ErasureStatus::Completed,
            _ => ErasureStatus::Pending,
        })
    }
}
