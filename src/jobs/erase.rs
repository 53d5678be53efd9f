//! The erasure job: `gdpr`'s saga run by the worker, and started on request (`erase_now`),
//! run at once when no worker holds it.

use std::{sync::Arc, time::Duration};

use super::worker::{JobHandler, Worker};
use crate::{
    domain::UserId,
    gdpr::{self, ErasurePlan, Tombstones},
    retry::JobFailure,
    store::{JobOutcome, JobState, OutboxJob, Store, StoreError},
    stripe::StripeClient,
};

/// How long an erasure request waits for the user's in-flight push before answering pending.
const ERASE_WAIT: Duration = Duration::from_secs(10);

pub struct Erase {
    store: Arc<dyn Store>,
    stripe: StripeClient,
    tombstones: Arc<Tombstones>,
}

impl Erase {
    pub fn new(store: Arc<dyn Store>, stripe: StripeClient, tombstones: Arc<Tombstones>) -> Self {
        Self {
            store,
            stripe,
            tombstones,
        }
    }
}

#[async_trait::async_trait]
impl JobHandler for Erase {
    async fn run(&self, job: &OutboxJob) -> Result<(), JobFailure> {
        gdpr::run_erasure(self.store.as_ref(), &self.stripe, &self.tombstones, job).await
    }
}

/// What an erasure request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErasureStatus {
    /// Everything is gone (or was already).
    Completed,
    /// A Stripe step failed; the saga is queued and will be retried.
    Pending,
}

/// Starts (or joins) the user's erasure and runs it now, with `worker`'s handlers, if no
/// worker holds it. Safe to repeat: a second request joins the first saga, and an erased
/// user is simply gone.
#[tracing::instrument(skip_all, fields(subject = %gdpr::subject_hash(user_id)))]
pub async fn erase_now(
    worker: &Worker,
    user_id: &UserId,
    delete_customer: bool,
) -> Result<ErasureStatus, StoreError> {
    let store = worker.store();
    let active = store.active_erase(user_id).await?;
    if active.is_none() && store.get_user(user_id).await?.is_none() {
        return Ok(ErasureStatus::Completed);
    }
    let job = match active {
        Some(job) => job,
        None => {
            let plan = ErasurePlan {
                customer_id: store
                    .get_link(user_id)
                    .await?
                    .map(|l| l.customer_id.to_string()),
                delete_customer,
                ..Default::default()
            };
            let payload = serde_json::to_value(&plan).expect("plans serialize");
            store.enqueue_erase(user_id, &payload).await?
        }
    };
    // Exclusive per user: the claim waits while a push of theirs is in flight (it lands
    // before the scrub, never after), briefly; past that the saga is left to the workers.
    let deadline = tokio::time::Instant::now() + ERASE_WAIT;
    let claimed = loop {
        if let Some(claimed) = store.claim_job(job.id, worker.lease()).await? {
            break claimed;
        }
        let still_pending = store
            .get_job(job.id)
            .await?
            .is_some_and(|j| j.state == JobState::Pending);
        if !still_pending || tokio::time::Instant::now() >= deadline {
            return Ok(ErasureStatus::Pending); // another worker is on it, or a push is
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let outcome = worker.run_job(&claimed).await;
    let recorded = worker.finish(&claimed, &outcome).await?;
    Ok(match outcome {
        JobOutcome::Done if recorded => ErasureStatus::Completed,
        _ => ErasureStatus::Pending,
    })
}
