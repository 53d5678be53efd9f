//! The erasure saga: cancels the customer's subscriptions, deletes or scrubs the customer,
//! then deletes the local rows, recording each step so that a retry resumes.

use std::collections::BTreeMap;

use serde_json::json;

use super::tombstones::{subject_hash, Tombstones};
use crate::{
    domain::UserId,
    retry::JobFailure,
    store::{Erased, OutboxJob, Store},
    stripe::{StripeClient, METADATA_PROFILE_VERSION, METADATA_USER_ID},
};

/// Erasure progress, kept in the job's payload so a retried saga skips finished steps.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Default)]
pub struct ErasurePlan {
    pub customer_id: Option<String>,
    pub delete_customer: bool,
    #[serde(default)]
    pub subscriptions_canceled: bool,
    #[serde(default)]
    pub customer_done: bool,
    #[serde(default)]
    pub canceled_count: u32,
}

/// Customers linked during one erasure run that it handles before giving up for a retry.
const MAX_RELINKS: u32 = 3;

/// Metadata keys billsync writes on customers; scrubbing empties them.
const OUR_METADATA: [&str; 6] = [
    METADATA_USER_ID,
    "source",
    "created_at",
    "last_profile_sync",
    "synced_from",
    METADATA_PROFILE_VERSION,
];

/// The saga: cancel the customer's subscriptions; delete the customer, or scrub it of email,
/// name, phone, description, address, shipping and billsync's metadata; then delete the local rows and write the audit entry. Each
/// step is idempotent and recorded, so a retry resumes where the last attempt stopped.
#[tracing::instrument(skip_all, fields(job_id = job.id))]
pub async fn run_erasure(
    store: &dyn Store,
    stripe: &StripeClient,
    tombstones: &Tombstones,
    job: &OutboxJob,
) -> Result<(), JobFailure> {
    let mut plan: ErasurePlan = serde_json::from_value(job.payload.clone())
        .map_err(|e| JobFailure::Permanent(format!("unreadable erasure plan: {e}")))?;
    let user = UserId::parse(&job.user_id)
        .map_err(|e| JobFailure::Permanent(format!("job user id: {}", e.message)))?;
    let hash = job
        .user_id
        .strip_prefix("erased:")
        .map_or_else(|| subject_hash(&user), str::to_owned);
    // The Stripe steps for the planned customer, then the local rows; a customer linked since
    // the plan is found inside the deleting transaction and handled in its turn.
    let mut relinks = 0;
    loop {
        if let Some(customer) = plan.customer_id.clone() {
            if !plan.subscriptions_canceled {
                let subscriptions = match stripe.list_subscriptions(&customer).await {
                    Ok(subs) => subs,
                    Err(err) if err.is_not_found() => Vec::new(),
                    Err(err) => return Err(err.into()),
                };
                for sub in subscriptions
                    .iter()
                    .filter(|s| !matches!(s.status.as_str(), "canceled" | "incomplete_expired"))
                {
                    match stripe.cancel_subscription(&sub.id).await {
                        Ok(_) => plan.canceled_count += 1,
                        Err(err) if err.is_not_found() => {}
                        Err(err) => return Err(err.into()),
                    }
                }
                plan.subscriptions_canceled = true;
                save(store, job, &plan).await?;
            }
            if !plan.customer_done {
                let result = if plan.delete_customer {
                    stripe.delete_customer(&customer).await.map(|_| ())
                } else {
                    // Our metadata is emptied, but `userId` keeps a tombstone (the subject hash):
                    // a customer with a non-empty userId is never linked to anyone by email, so a
                    // newcomer with the same address cannot inherit this customer's billing.
                    let mut metadata: BTreeMap<String, String> = OUR_METADATA
                        .iter()
                        .map(|k| ((*k).to_owned(), String::new()))
                        .collect();
                    metadata.insert(METADATA_USER_ID.to_owned(), format!("erased:{hash}"));
                    stripe
                        .scrub_customer(&customer, &metadata)
                        .await
                        .map(|_| ())
                };
                match result {
                    Ok(()) => {}
                    Err(err) if err.is_not_found() => {} // already gone
                    Err(err) => return Err(err.into()),
                }
                plan.customer_done = true;
                save(store, job, &plan).await?;
            }
        }
        let detail = json!({
            "delete_from_stripe": plan.delete_customer,
            "had_customer": plan.customer_id.is_some(),
            "subscriptions_canceled": plan.canceled_count,
        });
        // Before the rows go: from here on, tokens issued earlier are refused, even if the
        // deletion below has to be retried.
        tombstones.record(store, &user).await?;
        match store
            .erase_user(&user, plan.customer_id.as_deref(), &hash, &detail)
            .await?
        {
            Erased::Done(_) => break,
            Erased::Relinked(customer) if relinks < MAX_RELINKS => {
                relinks += 1;
                tracing::info!("a customer was linked during the erasure; handling it too");
                plan.customer_id = Some(customer);
                plan.subscriptions_canceled = false;
                plan.customer_done = false;
                save(store, job, &plan).await?;
            }
            Erased::Relinked(_) => {
                return Err(JobFailure::Transient {
                    error: "the user keeps being linked to new customers during the erasure".into(),
                    retry_after: None,
                })
            }
        }
    }
    tracing::info!(subject = %hash, "account erased");
    Ok(())
}

async fn save(store: &dyn Store, job: &OutboxJob, plan: &ErasurePlan) -> Result<(), JobFailure> {
    let payload = serde_json::to_value(plan).expect("plans serialize");
    if !store.save_job_payload(job, &payload).await? {
        // Another worker re-claimed the saga: it carries on from the saved steps.
        return Err(JobFailure::Transient {
            error: "erasure claim lost to another worker".into(),
            retry_after: None,
        });
    }
    Ok(())
}
