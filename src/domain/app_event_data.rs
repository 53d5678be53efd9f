//! The `data` of each app event type, declared once: the events are built from these types, and
//! the OpenAPI document describes them from the same declarations, so the TypeScript client
//! generated from it carries exactly what billsync sends.

use serde::Serialize;
use serde_json::Value;

use super::{ChangeOrigin, JobKind, LinkSource, UnlinkReason, UserId};

/// `customer.linked`: the user's Stripe customer was found or created.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CustomerLinkedData {
    #[schema(value_type = String)]
    pub user_id: UserId,
    pub customer_id: String,
    pub source: LinkSource,
}

/// `customer.unlinked`: the user no longer has that customer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CustomerUnlinkedData {
    #[schema(value_type = String)]
    pub user_id: UserId,
    pub customer_id: String,
    /// `deleted_in_stripe`: deleted in Stripe (the Dashboard, the API).
    pub reason: UnlinkReason,
}

/// `user.updated`: a real change of a profile field, never the echo of billsync's own push.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserUpdatedData {
    #[schema(value_type = String)]
    pub user_id: UserId,
    /// `stripe`: the billing portal or the Dashboard; `app`: the user routes; `admin`.
    pub origin: ChangeOrigin,
    /// The profile fields that changed: `email`, `email_verified`, `first_name`, `last_name`, `phone`.
    #[schema(value_type = Vec<String>)]
    pub changed: Vec<&'static str>,
    pub user: UserSnapshot,
}

/// The user as `user.updated` shows them (the admin API's shape, without timestamps).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserSnapshot {
    #[schema(value_type = String)]
    pub id: UserId,
    pub email: String,
    pub email_verified: bool,
    #[schema(required)]
    pub first_name: Option<String>,
    #[schema(required)]
    pub last_name: Option<String>,
    #[schema(required)]
    pub phone: Option<String>,
    pub version: i64,
}

/// `subscription.created`, `.updated` and `.deleted`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubscriptionChangeData {
    #[schema(value_type = String)]
    pub user_id: UserId,
    pub customer_id: String,
    pub subscription: SubscriptionSnapshot,
    /// The old values of the fields of `subscription` that changed (empty for a new one).
    #[schema(value_type = HashMap<String, serde_json::Value>)]
    pub previous: Value,
}

/// A subscription as billsync mirrors it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubscriptionSnapshot {
    pub id: String,
    pub customer_id: String,
    /// Stripe's status: `active`, `trialing`, `past_due`, `canceled`, …
    pub status: String,
    pub items: Vec<SubscriptionItemSnapshot>,
    pub cancel_at_period_end: bool,
    #[schema(required, format = DateTime)]
    pub cancel_at: Option<String>,
    #[schema(required, format = DateTime)]
    pub canceled_at: Option<String>,
    #[schema(required, format = DateTime)]
    pub ended_at: Option<String>,
    #[schema(required, format = DateTime)]
    pub current_period_end: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubscriptionItemSnapshot {
    #[schema(required)]
    pub price_id: Option<String>,
    #[schema(required)]
    pub quantity: Option<i64>,
    #[schema(required, format = DateTime)]
    pub current_period_end: Option<String>,
}

/// `plan.changed`: the plan computed from the user's subscriptions moved.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PlanChangedData {
    #[schema(value_type = String)]
    pub user_id: UserId,
    /// The plan's id; `null` when no plan applies (no default plan configured).
    #[schema(required)]
    pub plan: Option<String>,
    #[schema(required)]
    pub previous_plan: Option<String>,
    #[schema(required, value_type = Option<Vec<String>>)]
    pub features: Value,
    /// Numbers by name.
    #[schema(required, value_type = Option<HashMap<String, f64>>)]
    pub limits: Value,
}

/// `user.erased`: names the person by a keyed hash only.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserErasedData {
    pub subject: String,
}

/// `sync.failed`: a job towards Stripe was parked after its last attempt.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SyncFailedData {
    /// The job's user. An erasure's job no longer names the person once their rows are gone:
    /// it is then `erased:` and the keyed hash `user.erased` gave (`unknown` if unreadable).
    #[schema(value_type = String)]
    pub user_id: UserId,
    pub job_id: i64,
    pub kind: JobKind,
    pub attempts: i32,
    /// `stripe_rejected`, `stripe_unavailable`, `database_unavailable` or `failed`.
    pub error_code: &'static str,
}
