//! GDPR: export everything billsync holds about a user, and erase it (a resumable saga).

use std::collections::BTreeMap;

use axum::body::Bytes;
use futures_util::{stream, Stream, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::{
    domain::UserId,
    outbox::JobFailure,
    store::{OutboxJob, Store, StoreError, SubscriptionMirror, UsageRecord, User},
    stripe::{CustomerParams, StripeClient, METADATA_USER_ID},
};

pub const EXPORT_VERSION: &str = "3.0";
/// Usage records are read and written this many at a time, however many there are.
const USAGE_PAGE: u32 = 500;

/// The id as it may appear in logs and the audit trail: a hash, not the id.
pub fn subject_hash(user: &UserId) -> String {
    hex::encode(Sha256::digest(user.as_str().as_bytes()))
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).expect("UTC formats as RFC 3339")
}

fn user_json(user: &User) -> Value {
    json!({
        "id": user.id,
        "email": user.email,
        "email_verified": user.email_verified,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "phone": user.phone,
        "version": user.version,
        "created_at": rfc3339(user.created_at),
        "updated_at": rfc3339(user.updated_at),
    })
}

fn subscription_json(sub: &SubscriptionMirror) -> Value {
    json!({
        "id": sub.id,
        "stripe_customer_id": sub.customer_id,
        "status": sub.status,
        "price_id": sub.price_id,
        "cancel_at_period_end": sub.cancel_at_period_end,
        "current_period_end": sub.current_period_end.map(rfc3339),
        "cancel_at": sub.cancel_at.map(rfc3339),
        "canceled_at": sub.canceled_at.map(rfc3339),
        "ended_at": sub.ended_at.map(rfc3339),
        "items": sub.items.iter().map(|item| json!({
            "id": item.id,
            "price_id": item.price_id,
            "quantity": item.quantity,
            "current_period_end": item.current_period_end
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                .map(rfc3339),
        })).collect::<Vec<_>>(),
        "updated_at": rfc3339(sub.updated_at),
    })
}

fn usage_json(record: &UsageRecord) -> Value {
    json!({
        "id": record.id,
        "metric": record.metric,
        "quantity": record.quantity,
        "recorded_at": rfc3339(record.recorded_at),
        "created_at": rfc3339(record.created_at),
    })
}

/// The export as a stream of JSON text: every section but the usage records is gathered first
/// (the Stripe customer live; a Stripe failure becomes `null` plus a warning), then the usage
/// records are streamed page by page, so memory stays flat however many there are. A database
/// failure mid-stream ends the body early: the document is then visibly incomplete, never
/// silently truncated.
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub async fn export(
    store: std::sync::Arc<dyn Store>,
    stripe: &StripeClient,
    user: User,
) -> Result<impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static, StoreError> {
    let link = store.get_link(&user.id).await?;
    let subscriptions = store.list_subscriptions(&user.id).await?;
    let mut warnings: Vec<String> = Vec::new();
    // Stripe's objects pass through whole: nothing billsync does not model is dropped.
    let mut stripe_sections: Vec<(&str, Value)> = Vec::new();
    if let Some(link) = &link {
        let customer = link.customer_id.as_str();
        let fetched = [
            (
                "stripe_customer",
                stripe.retrieve_customer_raw(customer).await,
            ),
            (
                "stripe_subscriptions",
                stripe
                    .list_subscriptions_raw(customer)
                    .await
                    .map(Value::from),
            ),
            (
                "stripe_invoices",
                stripe.list_invoices_raw(customer).await.map(Value::from),
            ),
            (
                "stripe_payment_methods",
                stripe
                    .list_payment_methods_raw(customer)
                    .await
                    .map(Value::from),
            ),
        ];
        for (section, result) in fetched {
            let value = result.unwrap_or_else(|err| {
                tracing::warn!(error = %err, section, "export: Stripe section unavailable");
                warnings.push(format!("{section} could not be retrieved from Stripe"));
                Value::Null
            });
            stripe_sections.push((section, value));
        }
    } else {
        for section in [
            "stripe_customer",
            "stripe_subscriptions",
            "stripe_invoices",
            "stripe_payment_methods",
        ] {
            stripe_sections.push((section, Value::Null));
        }
    }
    let pushed_profile = store
        .last_push(&user.id)
        .await?
        .map(|p| json!({"email": p.email, "name": p.name, "phone": p.phone, "version": p.version}));
    // Insertion order is the document's order; usage_records goes last, streamed.
    let head: BTreeMap<&str, Value> = BTreeMap::from([
        ("export_version", json!(EXPORT_VERSION)),
        (
            "export_timestamp",
            json!(rfc3339(OffsetDateTime::now_utc())),
        ),
        ("user_profile", user_json(&user)),
        (
            "customer_link",
            link.as_ref().map_or(Value::Null, |l| {
                json!({
                    "stripe_customer_id": l.customer_id,
                    "livemode": l.livemode,
                    "linked_via": l.linked_via,
                    "linked_at": rfc3339(l.linked_at),
                })
            }),
        ),
        (
            "subscriptions",
            subscriptions.iter().map(subscription_json).collect(),
        ),
        ("pushed_profile", json!(pushed_profile)),
    ]);
    let mut head = head;
    head.extend(stripe_sections);
    head.insert("warnings", json!(warnings));
    let mut opening = serde_json::to_string(&head).expect("JSON values serialize");
    opening.pop(); // the closing brace: usage_records follows
    opening.push_str(",\"usage_records\":[");

    struct Cursor {
        after: i64,
        first: bool,
        done: bool,
    }
    let user_id = user.id.clone();
    let records = stream::unfold(
        Cursor {
            after: 0,
            first: true,
            done: false,
        },
        move |mut cursor| {
            let store = store.clone();
            let user_id = user_id.clone();
            async move {
                if cursor.done {
                    return None;
                }
                match store
                    .usage_records_page(&user_id, cursor.after, USAGE_PAGE)
                    .await
                {
                    Err(err) => {
                        cursor.done = true;
                        Some((Err(err), cursor))
                    }
                    Ok(page) if page.is_empty() => {
                        cursor.done = true;
                        Some((Ok(Bytes::from_static(b"]}")), cursor))
                    }
                    Ok(page) => {
                        let mut chunk = String::new();
                        for record in &page {
                            if !cursor.first {
                                chunk.push(',');
                            }
                            cursor.first = false;
                            chunk.push_str(&usage_json(record).to_string());
                        }
                        cursor.after = page.last().map_or(cursor.after, |r| r.id);
                        Some((Ok(Bytes::from(chunk)), cursor))
                    }
                }
            }
        },
    );
    Ok(stream::once(async move { Ok(Bytes::from(opening)) }).chain(records))
}

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

/// Metadata keys billsync writes on customers; scrubbing empties them.
const OUR_METADATA: [&str; 5] = [
    METADATA_USER_ID,
    "source",
    "created_at",
    "last_profile_sync",
    "synced_from",
];

/// The saga: cancel the customer's subscriptions; delete the customer, or scrub it of name,
/// phone and billsync's metadata; then delete the local rows and write the audit entry. Each
/// step is idempotent and recorded, so a retry resumes where the last attempt stopped.
#[tracing::instrument(skip_all, fields(job_id = job.id))]
pub async fn run_erasure(
    store: &dyn Store,
    stripe: &StripeClient,
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
            save(store, job.id, &plan).await?;
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
                let scrub = CustomerParams {
                    email: None,
                    name: Some(String::new()),
                    phone: Some(String::new()),
                    metadata,
                };
                stripe
                    .update_customer(&customer, &scrub, None)
                    .await
                    .map(|_| ())
            };
            match result {
                Ok(()) => {}
                Err(err) if err.is_not_found() => {} // already gone
                Err(err) => return Err(err.into()),
            }
            plan.customer_done = true;
            save(store, job.id, &plan).await?;
        }
    }
    let detail = json!({
        "delete_from_stripe": plan.delete_customer,
        "had_customer": plan.customer_id.is_some(),
        "subscriptions_canceled": plan.canceled_count,
    });
    store.erase_user(&user, &hash, &detail).await?;
    tracing::info!(subject = %hash, "account erased");
    Ok(())
}

async fn save(store: &dyn Store, job: i64, plan: &ErasurePlan) -> Result<(), JobFailure> {
    let payload = serde_json::to_value(plan).expect("plans serialize");
    store.save_job_payload(job, &payload).await?;
    Ok(())
}
