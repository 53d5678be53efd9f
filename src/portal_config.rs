//! The billing-portal configuration as code: a TOML file is validated (every error names its
//! key), turned into Stripe's parameters, and applied — created the first time, updated in
//! place when the file changed, left alone (no Stripe call) when it did not. The applied
//! configuration's id and a hash of its parameters are recorded under the file's `name`.

use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::{
    store::{PortalConfigRecord, Store, StoreError},
    stripe::{StripeClient, StripeError},
};

const CUSTOMER_UPDATE_FIELDS: [&str; 6] =
    ["email", "address", "shipping", "phone", "tax_id", "name"];
const CANCELLATION_REASONS: [&str; 8] = [
    "too_expensive",
    "missing_features",
    "switched_service",
    "unused",
    "customer_service",
    "too_complex",
    "low_quality",
    "other",
];
const SUBSCRIPTION_UPDATES: [&str; 3] = ["price", "quantity", "promotion_code"];
const UPDATE_PRORATIONS: [&str; 3] = ["none", "create_prorations", "always_invoice"];
const CANCEL_MODES: [&str; 2] = ["at_period_end", "immediately"];

#[derive(Debug, thiserror::Error)]
pub enum PortalConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Stripe(#[from] StripeError),
}

fn invalid(key: &str, message: impl std::fmt::Display) -> PortalConfigError {
    PortalConfigError::Invalid(format!("{key}: {message}"))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PortalSpec {
    /// billsync's name for this configuration (several may be kept as code).
    #[serde(default = "default_name")]
    pub name: String,
    pub default_return_url: Option<String>,
    pub business_profile: BusinessProfile,
    pub features: Features,
}

fn default_name() -> String {
    "default".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BusinessProfile {
    pub headline: Option<String>,
    pub privacy_policy_url: Option<String>,
    pub terms_of_service_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Features {
    pub payment_method_update: Option<Toggle>,
    pub invoice_history: Option<Toggle>,
    pub customer_update: Option<CustomerUpdate>,
    pub subscription_cancel: Option<SubscriptionCancel>,
    pub subscription_update: Option<SubscriptionUpdate>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Toggle {
    pub enabled: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CustomerUpdate {
    pub enabled: bool,
    #[serde(default)]
    pub allowed_updates: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionCancel {
    pub enabled: bool,
    pub mode: Option<String>,
    pub proration_behavior: Option<String>,
    pub cancellation_reason: Option<CancellationReason>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CancellationReason {
    pub enabled: bool,
    #[serde(default)]
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionUpdate {
    pub enabled: bool,
    #[serde(default)]
    pub default_allowed_updates: Vec<String>,
    pub proration_behavior: Option<String>,
    #[serde(default)]
    pub products: Vec<UpdatableProduct>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdatableProduct {
    pub product: String,
    pub prices: Vec<String>,
}

fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<(), PortalConfigError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{value:?} is not one of {}", allowed.join(", ")),
        ))
    }
}

fn all_of(key: &str, values: &[String], allowed: &[&str]) -> Result<(), PortalConfigError> {
    for (i, value) in values.iter().enumerate() {
        one_of(&format!("{key}[{i}]"), value, allowed)?;
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = values.iter().find(|v| !seen.insert(v.as_str())) {
        return Err(invalid(key, format!("{dup:?} is listed twice")));
    }
    Ok(())
}

fn url(key: &str, value: &Option<String>) -> Result<(), PortalConfigError> {
    match value {
        Some(v) if !(v.starts_with("https://") || v.starts_with("http://")) => {
            Err(invalid(key, format!("{v:?} is not an http(s) URL")))
        }
        _ => Ok(()),
    }
}

impl PortalSpec {
    /// Reads and validates a TOML file's text; the error names the key at fault.
    pub fn parse(text: &str) -> Result<Self, PortalConfigError> {
        let spec: Self = toml::from_str(text)
            .map_err(|e| PortalConfigError::Invalid(e.to_string().trim_end().replace('\n', " ")))?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), PortalConfigError> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(invalid("name", "use 1 to 64 letters, digits, '-' or '_'"));
        }
        url("default_return_url", &self.default_return_url)?;
        url(
            "business_profile.privacy_policy_url",
            &self.business_profile.privacy_policy_url,
        )?;
        url(
            "business_profile.terms_of_service_url",
            &self.business_profile.terms_of_service_url,
        )?;
        if let Some(headline) = &self.business_profile.headline {
            if headline.chars().count() > 60 {
                return Err(invalid(
                    "business_profile.headline",
                    "Stripe allows at most 60 characters",
                ));
            }
        }
        if let Some(update) = &self.features.customer_update {
            let key = "features.customer_update.allowed_updates";
            all_of(key, &update.allowed_updates, &CUSTOMER_UPDATE_FIELDS)?;
            if update.enabled && update.allowed_updates.is_empty() {
                return Err(invalid(
                    key,
                    "an enabled customer update needs at least one field",
                ));
            }
        }
        if let Some(cancel) = &self.features.subscription_cancel {
            let mode = cancel.mode.as_deref().unwrap_or("at_period_end");
            one_of("features.subscription_cancel.mode", mode, &CANCEL_MODES)?;
            if let Some(proration) = &cancel.proration_behavior {
                let key = "features.subscription_cancel.proration_behavior";
                match (proration.as_str(), mode) {
                    ("none", _) | ("create_prorations", "immediately") => {}
                    ("create_prorations", _) => {
                        return Err(invalid(
                            key,
                            "\"create_prorations\" needs mode = \"immediately\" (nothing is prorated at the period's end)",
                        ))
                    }
                    ("always_invoice", _) => {
                        return Err(invalid(
                            key,
                            "\"always_invoice\" is not allowed when cancelling; use \"none\" or \"create_prorations\"",
                        ))
                    }
                    (other, _) => {
                        return Err(invalid(
                            key,
                            format!("{other:?} is not one of none, create_prorations"),
                        ))
                    }
                }
            }
            if let Some(reason) = &cancel.cancellation_reason {
                let key = "features.subscription_cancel.cancellation_reason.options";
                all_of(key, &reason.options, &CANCELLATION_REASONS)?;
                if reason.enabled && reason.options.is_empty() {
                    return Err(invalid(
                        key,
                        "an enabled reason prompt needs at least one option",
                    ));
                }
            }
        }
        if let Some(update) = &self.features.subscription_update {
            let key = "features.subscription_update.default_allowed_updates";
            all_of(key, &update.default_allowed_updates, &SUBSCRIPTION_UPDATES)?;
            if update.enabled && update.default_allowed_updates.is_empty() {
                return Err(invalid(
                    key,
                    "an enabled subscription update needs at least one kind",
                ));
            }
            if let Some(proration) = &update.proration_behavior {
                one_of(
                    "features.subscription_update.proration_behavior",
                    proration,
                    &UPDATE_PRORATIONS,
                )?;
            }
            for (i, product) in update.products.iter().enumerate() {
                let key = format!("features.subscription_update.products[{i}]");
                if !product.product.starts_with("prod_") {
                    return Err(invalid(&format!("{key}.product"), "must be a prod_… id"));
                }
                if product.prices.is_empty()
                    || product.prices.iter().any(|p| !p.starts_with("price_"))
                {
                    return Err(invalid(&format!("{key}.prices"), "must list price_… ids"));
                }
            }
        }
        Ok(())
    }

    /// The parameters of `POST /v1/billing_portal/configurations`, as Stripe documents them.
    pub fn stripe_params(&self) -> Value {
        let mut features = Map::new();
        let toggle = |t: &Toggle| json!({ "enabled": t.enabled });
        if let Some(t) = &self.features.payment_method_update {
            features.insert("payment_method_update".into(), toggle(t));
        }
        if let Some(t) = &self.features.invoice_history {
            features.insert("invoice_history".into(), toggle(t));
        }
        if let Some(u) = &self.features.customer_update {
            let mut value = json!({ "enabled": u.enabled });
            if !u.allowed_updates.is_empty() {
                value["allowed_updates"] = json!(u.allowed_updates);
            }
            features.insert("customer_update".into(), value);
        }
        if let Some(c) = &self.features.subscription_cancel {
            let mut value = json!({ "enabled": c.enabled });
            if let Some(mode) = &c.mode {
                value["mode"] = json!(mode);
            }
            if let Some(proration) = &c.proration_behavior {
                value["proration_behavior"] = json!(proration);
            }
            if let Some(reason) = &c.cancellation_reason {
                let mut r = json!({ "enabled": reason.enabled });
                if !reason.options.is_empty() {
                    r["options"] = json!(reason.options);
                }
                value["cancellation_reason"] = r;
            }
            features.insert("subscription_cancel".into(), value);
        }
        if let Some(u) = &self.features.subscription_update {
            let mut value = json!({ "enabled": u.enabled });
            if !u.default_allowed_updates.is_empty() {
                value["default_allowed_updates"] = json!(u.default_allowed_updates);
            }
            if let Some(proration) = &u.proration_behavior {
                value["proration_behavior"] = json!(proration);
            }
            if !u.products.is_empty() {
                value["products"] = u
                    .products
                    .iter()
                    .map(|p| json!({ "product": p.product, "prices": p.prices }))
                    .collect();
            }
            features.insert("subscription_update".into(), value);
        }
        let mut profile = Map::new();
        for (key, value) in [
            ("headline", &self.business_profile.headline),
            (
                "privacy_policy_url",
                &self.business_profile.privacy_policy_url,
            ),
            (
                "terms_of_service_url",
                &self.business_profile.terms_of_service_url,
            ),
        ] {
            if let Some(v) = value {
                profile.insert(key.into(), json!(v));
            }
        }
        let mut params = json!({
            "business_profile": profile,
            "features": features,
            "metadata": { "billsync_name": self.name },
        });
        if let Some(url) = &self.default_return_url {
            params["default_return_url"] = json!(url);
        }
        params
    }
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Applied {
    Created { id: String },
    Updated { id: String },
    Unchanged { id: String },
}

impl Applied {
    pub fn id(&self) -> &str {
        match self {
            Self::Created { id } | Self::Updated { id } | Self::Unchanged { id } => id,
        }
    }
}

/// A stable fingerprint of the parameters (serde_json maps are ordered, so the text is too).
fn fingerprint(params: &Value) -> String {
    hex::encode(Sha256::digest(params.to_string().as_bytes()))
}

/// Creates, updates or leaves the configuration so Stripe holds what the spec says.
#[tracing::instrument(skip_all, fields(name = %spec.name))]
pub async fn apply(
    store: &dyn Store,
    stripe: &StripeClient,
    spec: &PortalSpec,
) -> Result<Applied, PortalConfigError> {
    let params = spec.stripe_params();
    let hash = fingerprint(&params);
    let applied = match store.portal_config(&spec.name).await? {
        Some(record) if record.spec_hash == hash => {
            return Ok(Applied::Unchanged {
                id: record.stripe_configuration_id,
            })
        }
        Some(record) => {
            let updated = stripe
                .update_portal_configuration(&record.stripe_configuration_id, &params)
                .await?;
            Applied::Updated { id: updated.id }
        }
        None => {
            // Keyed by the name and content: a retry after a lost answer (or a crash before
            // the id was recorded) gets the same configuration back instead of a second one.
            let key = format!("billsync-portal-{}-{}", spec.name, &hash[..32]);
            let created = stripe.create_portal_configuration(&params, &key).await?;
            Applied::Created { id: created.id }
        }
    };
    store
        .save_portal_config(&PortalConfigRecord {
            name: spec.name.clone(),
            stripe_configuration_id: applied.id().to_owned(),
            spec_hash: hash,
            applied_at: crate::store::now(),
        })
        .await?;
    tracing::info!(?applied, "portal configuration applied");
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../portal.example.toml");

    #[test]
    fn the_shipped_example_is_valid_and_matches_the_spec() {
        let spec = PortalSpec::parse(EXAMPLE).unwrap();
        let params = spec.stripe_params();
        assert_eq!(
            params["features"]["customer_update"]["allowed_updates"],
            json!(["email", "name", "phone", "address", "tax_id"])
        );
        assert_eq!(
            params["features"]["subscription_cancel"]["mode"],
            "at_period_end"
        );
        assert_eq!(
            params["features"]["subscription_update"]["proration_behavior"],
            "create_prorations"
        );
        assert_eq!(fingerprint(&params), fingerprint(&spec.stripe_params()));
    }
}
