//! The local mirror of Stripe billing: subscriptions, and portal configurations as code.

use time::OffsetDateTime;

use super::UserId;

/// The local mirror of one Stripe subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionMirror {
    pub id: String,
    pub user_id: Option<UserId>,
    pub customer_id: String,
    pub status: String,
    pub price_id: Option<String>,
    pub cancel_at_period_end: bool,
    pub current_period_end: Option<OffsetDateTime>,
    pub updated_at: OffsetDateTime,
    /// When it will end (basil: a portal cancellation may set this with
    /// `cancel_at_period_end` false).
    pub cancel_at: Option<OffsetDateTime>,
    pub canceled_at: Option<OffsetDateTime>,
    pub ended_at: Option<OffsetDateTime>,
    /// Every item, not only the first.
    pub items: Vec<SubscriptionItemMirror>,
}

/// One item of a mirrored subscription.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SubscriptionItemMirror {
    pub id: Option<String>,
    pub price_id: Option<String>,
    pub quantity: Option<i64>,
    /// Unix seconds (basil keeps the period per item).
    pub current_period_end: Option<i64>,
}

/// A billing-portal configuration kept as code, as last applied.
#[derive(Debug, Clone, PartialEq)]
pub struct PortalConfigRecord {
    pub name: String,
    pub stripe_configuration_id: String,
    /// Fingerprint of the parameters sent to Stripe.
    pub spec_hash: String,
    pub applied_at: OffsetDateTime,
}
