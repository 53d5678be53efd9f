//! The billing read: what a billing page and a feature gate need about one user (their
//! customer, their plan, their subscriptions), from billsync's mirror, with no Stripe call.

use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    domain::{SubscriptionMirror, UserId},
    plans::{Plan, Plans},
    store::{Store, StoreResult},
};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BillingView {
    #[schema(value_type = String)]
    pub user_id: UserId,
    pub customer: Option<BillingCustomer>,
    /// The user's plan: the highest a live subscription grants, else the plans file's default;
    /// `null` without a plans file.
    pub plan: Option<Plan>,
    pub subscriptions: Vec<SubscriptionView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BillingCustomer {
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub linked_at: OffsetDateTime,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubscriptionView {
    pub id: String,
    pub status: String,
    pub items: Vec<SubscriptionItemView>,
    pub cancel_at_period_end: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub cancel_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub current_period_end: Option<OffsetDateTime>,
    /// The plan this subscription grants on its own, if it is live and names a plan's price.
    pub plan: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubscriptionItemView {
    pub price_id: Option<String>,
    pub quantity: Option<i64>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub current_period_end: Option<OffsetDateTime>,
}

impl SubscriptionView {
    pub fn new(subscription: &SubscriptionMirror, plans: &Plans) -> Self {
        let at = |t: Option<i64>| t.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
        Self {
            id: subscription.id.clone(),
            status: subscription.status.clone(),
            items: subscription
                .items
                .iter()
                .map(|item| SubscriptionItemView {
                    price_id: item.price_id.clone(),
                    quantity: item.quantity,
                    current_period_end: at(item.current_period_end),
                })
                .collect(),
            cancel_at_period_end: subscription.cancel_at_period_end,
            cancel_at: subscription.cancel_at,
            current_period_end: subscription.current_period_end,
            plan: plans
                .plan_of_subscription(subscription)
                .map(|p| p.id.clone()),
        }
    }
}

/// The user's billing document.
pub async fn read(store: &dyn Store, plans: &Plans, user: &UserId) -> StoreResult<BillingView> {
    let link = store.get_link(user).await?;
    let subscriptions = store.list_subscriptions(user).await?;
    Ok(BillingView {
        user_id: user.clone(),
        customer: link.map(|l| BillingCustomer {
            id: l.customer_id.to_string(),
            linked_at: l.linked_at,
        }),
        plan: plans.plan_for(&subscriptions).cloned(),
        subscriptions: subscriptions
            .iter()
            .map(|s| SubscriptionView::new(s, plans))
            .collect(),
    })
}
