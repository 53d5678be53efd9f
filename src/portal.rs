//! Billing-portal sessions for the app's users.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    domain::UserId,
    store::{Store, StoreError},
    stripe::{StripeClient, StripeError},
};

/// A deep link into one portal flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PortalFlow {
    PaymentMethodUpdate,
    SubscriptionCancel,
    SubscriptionUpdate,
}

impl PortalFlow {
    fn as_str(self) -> &'static str {
        match self {
            Self::PaymentMethodUpdate => "payment_method_update",
            Self::SubscriptionCancel => "subscription_cancel",
            Self::SubscriptionUpdate => "subscription_update",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error("no Stripe customer is linked to this user")]
    NoCustomer,
    #[error("this flow needs an active subscription, and the user has none")]
    NoSubscription,
    #[error("the billing portal is not configured: set APP_URL")]
    NotConfigured,
    #[error(transparent)]
    Stripe(#[from] StripeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Statuses a subscription can be managed in.
const MANAGEABLE: [&str; 4] = ["active", "trialing", "past_due", "unpaid"];

/// Creates a portal session; `return_url` is always `${APP_URL}/billing`, never the caller's.
#[tracing::instrument(skip_all, fields(user_id = %user_id))]
pub async fn create_session(
    store: &dyn Store,
    stripe: &StripeClient,
    app_url: Option<&str>,
    configuration: Option<&str>,
    user_id: &UserId,
    flow: Option<PortalFlow>,
) -> Result<String, PortalError> {
    let app_url = app_url.ok_or(PortalError::NotConfigured)?;
    let link = store
        .get_link(user_id)
        .await?
        .ok_or(PortalError::NoCustomer)?;
    let mut params = Map::new();
    params.insert("customer".into(), json!(link.customer_id));
    params.insert("return_url".into(), json!(format!("{app_url}/billing")));
    if let Some(configuration) = configuration {
        params.insert("configuration".into(), json!(configuration));
    }
    if let Some(flow) = flow {
        let mut flow_data = Map::new();
        flow_data.insert("type".into(), json!(flow.as_str()));
        if flow != PortalFlow::PaymentMethodUpdate {
            let subscription = store
                .list_subscriptions(user_id)
                .await?
                .into_iter()
                .find(|s| MANAGEABLE.contains(&s.status.as_str()))
                .ok_or(PortalError::NoSubscription)?;
            flow_data.insert(
                flow.as_str().into(),
                json!({"subscription": subscription.id}),
            );
        }
        params.insert("flow_data".into(), Value::Object(flow_data));
    }
    let session = stripe.create_portal_session(&Value::Object(params)).await?;
    Ok(session.url)
}
