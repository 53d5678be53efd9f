//! The local mirror of Stripe billing: subscriptions, and portal configurations as code.

use time::OffsetDateTime;

use super::{SubscriptionItemSnapshot, SubscriptionSnapshot, UserId};

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
    /// The price's lookup key, which a plans file may name instead of its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup_key: Option<String>,
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

impl SubscriptionMirror {
    /// Whether it has ended for good (Stripe deleted it, or it never got paid).
    pub fn has_ended(&self) -> bool {
        matches!(self.status.as_str(), "canceled" | "incomplete_expired")
    }

    /// The subscription as app events carry it.
    pub fn snapshot(&self) -> SubscriptionSnapshot {
        let at = |t: Option<OffsetDateTime>| {
            t.and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
        };
        let unix = |t: Option<i64>| at(t.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()));
        SubscriptionSnapshot {
            id: self.id.clone(),
            customer_id: self.customer_id.clone(),
            status: self.status.clone(),
            items: self
                .items
                .iter()
                .map(|item| SubscriptionItemSnapshot {
                    price_id: item.price_id.clone(),
                    quantity: item.quantity,
                    current_period_end: unix(item.current_period_end),
                })
                .collect(),
            cancel_at_period_end: self.cancel_at_period_end,
            cancel_at: at(self.cancel_at),
            canceled_at: at(self.canceled_at),
            ended_at: at(self.ended_at),
            current_period_end: at(self.current_period_end),
        }
    }

    /// [`snapshot`](Self::snapshot) as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.snapshot()).expect("a snapshot serializes")
    }
}

/// The old values of the fields that differ between two JSON objects.
pub fn previous_values(before: &serde_json::Value, after: &serde_json::Value) -> serde_json::Value {
    let (Some(before), Some(after)) = (before.as_object(), after.as_object()) else {
        return serde_json::json!({});
    };
    before
        .iter()
        .filter(|(field, old)| after.get(field.as_str()) != Some(*old))
        .map(|(field, old)| (field.clone(), old.clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}
