//! Lenient views of Stripe objects: only the fields billsync reads, unknown fields ignored,
//! missing or `null` collections read as empty (localstripe and old API versions differ).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;

use crate::domain::{SubscriptionItemMirror, SubscriptionMirror, UserId};

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct List<T> {
    #[serde(default = "Vec::new")]
    pub data: Vec<T>,
    #[serde(default)]
    pub has_more: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Customer {
    pub id: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub livemode: bool,
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub deleted: bool,
}

impl Customer {
    /// The billsync user this customer was created for, if any.
    pub fn user_id_metadata(&self) -> Option<&str> {
        self.metadata
            .get(crate::stripe::METADATA_USER_ID)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The profile version billsync's newest push to this customer stamped, if any.
    pub fn profile_stamp(&self) -> Option<i64> {
        self.metadata
            .get(crate::stripe::METADATA_PROFILE_VERSION)
            .and_then(|v| v.parse().ok())
    }
}

/// The answer to a delete.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Deleted {
    pub id: String,
    #[serde(default)]
    pub deleted: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct IdOnly {
    pub id: String,
}

/// A subscription's `customer`: an id, or the customer object when expanded.
fn id_or_object<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IdOrObject {
        Id(String),
        Object { id: String },
    }
    Ok(match IdOrObject::deserialize(d)? {
        IdOrObject::Id(id) | IdOrObject::Object { id } => id,
    })
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct SubscriptionItem {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub quantity: Option<i64>,
    #[serde(default)]
    pub price: Option<ItemPrice>,
    #[serde(default)]
    pub plan: Option<IdOnly>,
    /// Where API versions from 2025-03-31 put the period end.
    #[serde(default)]
    pub current_period_end: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Subscription {
    pub id: String,
    #[serde(deserialize_with = "id_or_object")]
    pub customer: String,
    pub status: String,
    #[serde(default)]
    pub cancel_at_period_end: bool,
    /// When it will end (basil's portal cancellation may set this instead of
    /// `cancel_at_period_end`).
    #[serde(default)]
    pub cancel_at: Option<i64>,
    #[serde(default)]
    pub canceled_at: Option<i64>,
    #[serde(default)]
    pub ended_at: Option<i64>,
    /// Where API versions before 2025-03-31 put the period end.
    #[serde(default)]
    pub current_period_end: Option<i64>,
    #[serde(default)]
    pub plan: Option<IdOnly>,
    #[serde(default)]
    pub items: Option<List<SubscriptionItem>>,
}

/// A subscription item's price: its id, and the lookup key a plans file may name it by.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ItemPrice {
    pub id: String,
    #[serde(default)]
    pub lookup_key: Option<String>,
}

impl SubscriptionItem {
    /// The item's price id (or legacy plan id).
    pub fn price_id(&self) -> Option<&str> {
        self.price
            .as_ref()
            .map(|p| p.id.as_str())
            .or(self.plan.as_ref().map(|p| p.id.as_str()))
    }

    pub fn lookup_key(&self) -> Option<&str> {
        self.price.as_ref().and_then(|p| p.lookup_key.as_deref())
    }
}

impl Subscription {
    fn first_item(&self) -> Option<&SubscriptionItem> {
        self.items.as_ref().and_then(|items| items.data.first())
    }

    /// The price id (or legacy plan id) of the subscription's first item.
    pub fn price_id(&self) -> Option<&str> {
        self.first_item()
            .and_then(SubscriptionItem::price_id)
            .or(self.plan.as_ref().map(|p| p.id.as_str()))
    }

    /// Every item (empty when the object has none).
    pub fn all_items(&self) -> &[SubscriptionItem] {
        self.items
            .as_ref()
            .map_or(&[], |items| items.data.as_slice())
    }

    pub fn current_period_end(&self) -> Option<i64> {
        self.current_period_end
            .or_else(|| self.first_item().and_then(|item| item.current_period_end))
    }

    /// The subscription as billsync mirrors it, for `user` (the owner of its customer's link,
    /// if linked); a webhook and a reconciliation write the same mirror of the same object.
    pub fn into_mirror(self, user: Option<UserId>) -> SubscriptionMirror {
        let unix = |seconds: Option<i64>| {
            seconds.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        };
        SubscriptionMirror {
            user_id: user,
            customer_id: self.customer.clone(),
            status: self.status.clone(),
            price_id: self.price_id().map(str::to_owned),
            cancel_at_period_end: self.cancel_at_period_end,
            current_period_end: unix(self.current_period_end()),
            updated_at: crate::store::now(),
            cancel_at: unix(self.cancel_at),
            canceled_at: unix(self.canceled_at),
            ended_at: unix(self.ended_at),
            items: self
                .all_items()
                .iter()
                .map(|item| SubscriptionItemMirror {
                    id: item.id.clone(),
                    price_id: item.price_id().map(str::to_owned),
                    lookup_key: item.lookup_key().map(str::to_owned),
                    quantity: item.quantity,
                    current_period_end: item.current_period_end,
                })
                .collect(),
            id: self.id,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct PortalSession {
    pub id: String,
    pub url: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct PortalConfiguration {
    pub id: String,
    #[serde(default)]
    pub is_default: bool,
    #[serde(default)]
    pub active: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_localstripe_and_current_api_shapes() {
        let legacy: Subscription = serde_json::from_str(
            r#"{"id":"sub_1","customer":"cus_1","status":"active","current_period_end":100,
                "plan":{"id":"pro","amount":1000},"items":{"data":[{"plan":{"id":"pro"}}]}}"#,
        )
        .unwrap();
        assert_eq!(legacy.price_id(), Some("pro"));
        assert_eq!(legacy.current_period_end(), Some(100));

        let current: Subscription = serde_json::from_str(
            r#"{"id":"sub_2","customer":"cus_1","status":"trialing","cancel_at_period_end":true,
                "items":{"object":"list","data":[{"price":{"id":"price_9"},"current_period_end":200}]}}"#,
        )
        .unwrap();
        assert_eq!(current.price_id(), Some("price_9"));
        assert_eq!(current.current_period_end(), Some(200));
        assert!(current.cancel_at_period_end);

        let customer: Customer = serde_json::from_str(
            r#"{"id":"cus_1","email":null,"metadata":null,"sources":{"data":[]},"extra":1}"#,
        )
        .unwrap();
        assert!(customer.metadata.is_empty());
        assert_eq!(customer.user_id_metadata(), None);
    }
}

/// A price, as `billsync plans check` reads it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Price {
    pub id: String,
    #[serde(default)]
    pub active: bool,
    #[serde(default)]
    pub lookup_key: Option<String>,
}

/// A webhook endpoint (`/v1/webhook_endpoints`).
#[derive(Debug, Clone, Deserialize)]
pub struct WebhookEndpoint {
    pub id: String,
    pub url: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub enabled_events: Vec<String>,
    /// The version its events are generated with; `null`: the account's default.
    #[serde(default)]
    pub api_version: Option<String>,
    /// `enabled` or `disabled`.
    #[serde(default)]
    pub status: String,
    /// The signing secret: only in the answer to the create (Stripe shows it then only).
    #[serde(default)]
    pub secret: Option<crate::config::Secret>,
}
