//! The billing-portal configuration as code: a TOML file is validated (every error names its
//! key), turned into the state Stripe should hold, and applied — created the first time,
//! updated in place when the file changed (every modeled field is sent, a removed one as
//! Stripe's explicit empty value, so nothing the file no longer says stays live), and compared
//! with Stripe's current copy when it did not (a Dashboard edit is repaired, nothing else is
//! written). The applied configuration's id and a hash of that state are recorded under the
//! file's `name`.

use serde::Deserialize;
use serde_json::{json, Value};
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
/// Stripe's limit on `features.subscription_update.products`.
const MAX_UPDATE_PRODUCTS: usize = 10;
const FEATURES: [&str; 5] = [
    "payment_method_update",
    "invoice_history",
    "customer_update",
    "subscription_cancel",
    "subscription_update",
];
/// The one empty list Stripe requires on create (`Array | ''`, not optional): without it the
/// create is refused with `parameter_missing`, even when the reason prompt is off.
const REQUIRED_ON_CREATE: &str = "features.subscription_cancel.cancellation_reason.options";

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
        if self.features == Features::default() {
            return Err(invalid(
                "features",
                format!(
                    "the table names no feature; set at least one of {}",
                    FEATURES.join(", ")
                ),
            ));
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
            let key = "features.subscription_update.products";
            if update.enabled && update.products.is_empty() {
                return Err(invalid(
                    key,
                    "an enabled subscription update needs the products (each with its prices) customers may switch between",
                ));
            }
            if update.products.len() > MAX_UPDATE_PRODUCTS {
                return Err(invalid(
                    key,
                    format!(
                        "Stripe allows at most {MAX_UPDATE_PRODUCTS} products, the file lists {}",
                        update.products.len()
                    ),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for (i, product) in update.products.iter().enumerate() {
                let key = format!("{key}[{i}]");
                if !product.product.starts_with("prod_") {
                    return Err(invalid(&format!("{key}.product"), "must be a prod_… id"));
                }
                if !seen.insert(product.product.as_str()) {
                    return Err(invalid(
                        &format!("{key}.product"),
                        format!("{:?} is listed twice", product.product),
                    ));
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

    /// What Stripe should hold after an apply, in the configuration object's own shape: every
    /// field the file models, a field the file leaves out at Stripe's empty value (`null`, `[]`)
    /// or default (a feature off, `mode = "at_period_end"`, `proration_behavior = "none"`).
    /// Both requests and the drift check are derived from it, so they cannot disagree.
    pub fn desired(&self) -> Value {
        let f = &self.features;
        let on = |t: &Option<Toggle>| t.as_ref().is_some_and(|t| t.enabled);
        let customer = f.customer_update.as_ref();
        let cancel = f.subscription_cancel.as_ref();
        let reason = cancel.and_then(|c| c.cancellation_reason.as_ref());
        let update = f.subscription_update.as_ref();
        let products: Vec<Value> = update
            .map(|u| u.products.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|p| json!({ "product": p.product, "prices": p.prices }))
            .collect();
        json!({
            "business_profile": {
                "headline": self.business_profile.headline,
                "privacy_policy_url": self.business_profile.privacy_policy_url,
                "terms_of_service_url": self.business_profile.terms_of_service_url,
            },
            "default_return_url": self.default_return_url,
            "features": {
                "customer_update": {
                    "enabled": customer.is_some_and(|c| c.enabled),
                    "allowed_updates": customer.map(|c| c.allowed_updates.as_slice()).unwrap_or_default(),
                },
                "invoice_history": { "enabled": on(&f.invoice_history) },
                "payment_method_update": { "enabled": on(&f.payment_method_update) },
                "subscription_cancel": {
                    "enabled": cancel.is_some_and(|c| c.enabled),
                    "mode": cancel.and_then(|c| c.mode.as_deref()).unwrap_or("at_period_end"),
                    "proration_behavior": cancel
                        .and_then(|c| c.proration_behavior.as_deref())
                        .unwrap_or("none"),
                    "cancellation_reason": {
                        "enabled": reason.is_some_and(|r| r.enabled),
                        "options": reason.map(|r| r.options.as_slice()).unwrap_or_default(),
                    },
                },
                "subscription_update": {
                    "enabled": update.is_some_and(|u| u.enabled),
                    "default_allowed_updates": update
                        .map(|u| u.default_allowed_updates.as_slice())
                        .unwrap_or_default(),
                    "proration_behavior": update
                        .and_then(|u| u.proration_behavior.as_deref())
                        .unwrap_or("none"),
                    "products": products,
                },
            },
            "metadata": { "billsync_name": self.name },
        })
    }

    /// The parameters of `POST /v1/billing_portal/configurations`: empty fields are left out
    /// (a new configuration starts empty, and create refuses `''` for the policy URLs), except
    /// the reason options Stripe requires.
    pub fn create_params(&self) -> Value {
        without_empties(&self.desired(), "", &|path| {
            (path == REQUIRED_ON_CREATE).then(|| json!(""))
        })
        .unwrap_or_default()
    }

    /// The parameters of `POST /v1/billing_portal/configurations/{id}`: every modeled field,
    /// an empty one as `''` (Stripe's `Emptyable`, sent as `key=`, which clears it). Stripe
    /// keeps any field an update does not send, so leaving it out would keep it live.
    pub fn update_params(&self) -> Value {
        without_empties(&self.desired(), "", &|_| Some(json!(""))).unwrap_or_default()
    }

    /// The dotted names of the modeled fields where Stripe's copy (`live`, the retrieved
    /// object) differs from the file. Fields the file does not model are not compared; lists
    /// are compared as sets (Stripe's order is not the file's promise), and a product only by
    /// its id and prices.
    pub fn drift(&self, live: &Value) -> Vec<String> {
        let mut drifted = Vec::new();
        compare(&self.desired(), live, "", &mut drifted);
        drifted
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

/// `value` with each empty leaf replaced by what `empty` says for its dotted path (`None`
/// leaves the key out).
fn without_empties(
    value: &Value,
    path: &str,
    empty: &dyn Fn(&str) -> Option<Value>,
) -> Option<Value> {
    match value {
        Value::Object(map) => Some(Value::Object(
            map.iter()
                .filter_map(|(key, inner)| {
                    without_empties(inner, &join(path, key), empty).map(|v| (key.clone(), v))
                })
                .collect(),
        )),
        leaf if is_empty(leaf) => empty(path),
        leaf => Some(leaf.clone()),
    }
}

fn compare(desired: &Value, live: &Value, path: &str, drifted: &mut Vec<String>) {
    if let Value::Object(map) = desired {
        for (key, inner) in map {
            let live = live.get(key).unwrap_or(&Value::Null);
            compare(inner, live, &join(path, key), drifted);
        }
    } else if comparable(desired, desired) != comparable(live, desired) {
        drifted.push(path.to_owned());
    }
}

/// `value` as the drift check sees it next to the file's `model` leaf: empty is empty
/// (`null`, `""`, `[]`), lists are sorted, and a list's objects keep only the keys the file's
/// objects have (a product's `adjustable_quantity` is not modeled).
fn comparable(value: &Value, model: &Value) -> Value {
    if is_empty(value) {
        return Value::Null;
    }
    let Value::Array(items) = value else {
        return value.clone();
    };
    let keys: std::collections::BTreeSet<&String> = match model {
        Value::Array(model) => model
            .iter()
            .filter_map(Value::as_object)
            .flat_map(|o| o.keys())
            .collect(),
        _ => Default::default(),
    };
    let mut items: Vec<Value> = items
        .iter()
        .map(|item| match item {
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(key, _)| keys.contains(key))
                    .map(|(key, inner)| (key.clone(), comparable(inner, inner)))
                    .collect(),
            ),
            other => other.clone(),
        })
        .collect();
    items.sort_by_key(Value::to_string);
    Value::Array(items)
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Applied {
    Created {
        id: String,
    },
    Updated {
        id: String,
    },
    /// The file had not changed but Stripe's copy had (a Dashboard edit): updated back, and
    /// `drifted` names the fields that had differed.
    Repaired {
        id: String,
        drifted: Vec<String>,
    },
    Unchanged {
        id: String,
    },
}

impl Applied {
    pub fn id(&self) -> &str {
        match self {
            Self::Created { id }
            | Self::Updated { id }
            | Self::Repaired { id, .. }
            | Self::Unchanged { id } => id,
        }
    }
}

/// What `apply --check` found; it changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Checked {
    InSync {
        id: String,
    },
    /// Stripe's copy differs from the file in these (dotted) fields.
    Drifted {
        id: String,
        drifted: Vec<String>,
    },
    /// No configuration was applied under the file's name: an apply would create one.
    NotApplied {
        name: String,
    },
}

/// A stable fingerprint of the desired state (serde_json maps are ordered, so the text is
/// too). It changed when updates began sending every field, so the first apply after that
/// upgrade is one `updated`, which also clears whatever earlier updates had left behind.
fn fingerprint(desired: &Value) -> String {
    hex::encode(Sha256::digest(desired.to_string().as_bytes()))
}

/// Creates, updates or leaves the configuration so Stripe holds what the spec says.
#[tracing::instrument(skip_all, fields(name = %spec.name))]
pub async fn apply(
    store: &dyn Store,
    stripe: &StripeClient,
    spec: &PortalSpec,
) -> Result<Applied, PortalConfigError> {
    let hash = fingerprint(&spec.desired());
    let applied = match store.portal_config(&spec.name).await? {
        Some(record) if record.spec_hash == hash => {
            // The file is what was applied, but the portal can be edited in the Dashboard:
            // one read decides, and only a difference is written.
            let id = record.stripe_configuration_id;
            let drifted = spec.drift(&stripe.retrieve_portal_configuration(&id).await?);
            if drifted.is_empty() {
                return Ok(Applied::Unchanged { id });
            }
            let updated = stripe
                .update_portal_configuration(&id, &spec.update_params())
                .await?;
            Applied::Repaired {
                id: updated.id,
                drifted,
            }
        }
        Some(record) => {
            let updated = stripe
                .update_portal_configuration(&record.stripe_configuration_id, &spec.update_params())
                .await?;
            Applied::Updated { id: updated.id }
        }
        None => {
            // Keyed by the name and content: a retry after a lost answer (or a crash before
            // the id was recorded) gets the same configuration back instead of a second one.
            let key = format!("billsync-portal-{}-{}", spec.name, &hash[..32]);
            let created = stripe
                .create_portal_configuration(&spec.create_params(), &key)
                .await?;
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

/// Compares the file with Stripe's current copy of the configuration applied under its name.
pub async fn check(
    store: &dyn Store,
    stripe: &StripeClient,
    spec: &PortalSpec,
) -> Result<Checked, PortalConfigError> {
    let Some(record) = store.portal_config(&spec.name).await? else {
        return Ok(Checked::NotApplied {
            name: spec.name.clone(),
        });
    };
    let id = record.stripe_configuration_id;
    let drifted = spec.drift(&stripe.retrieve_portal_configuration(&id).await?);
    Ok(if drifted.is_empty() {
        Checked::InSync { id }
    } else {
        Checked::Drifted { id, drifted }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../portal.example.toml");
    const UPDATE_OFF: &str = "[features.subscription_update]\n# Off until you list your products: Stripe refuses an enabled subscription update without\n# them. To let customers switch plans, set enabled = true and uncomment the products.\nenabled = false";

    /// The example with its subscription update turned on and `products` appended.
    fn with_products(products: &str) -> String {
        assert!(EXAMPLE.contains(UPDATE_OFF));
        format!(
            "{}{products}",
            EXAMPLE.replace(UPDATE_OFF, "[features.subscription_update]\nenabled = true")
        )
    }

    fn product(i: usize) -> String {
        format!(
            "\n[[features.subscription_update.products]]\nproduct = \"prod_{i}\"\nprices = [\"price_{i}a\", \"price_{i}b\"]\n"
        )
    }

    #[test]
    fn the_shipped_example_is_valid_and_matches_the_spec() {
        let spec = PortalSpec::parse(EXAMPLE).unwrap();
        let desired = spec.desired();
        assert_eq!(
            desired["features"]["customer_update"]["allowed_updates"],
            json!(["email", "name", "phone", "address", "tax_id"])
        );
        assert_eq!(
            desired["features"]["subscription_cancel"]["mode"],
            "at_period_end"
        );
        assert_eq!(
            desired["features"]["subscription_update"],
            json!({
                "enabled": false,
                "default_allowed_updates": ["price"],
                "proration_behavior": "create_prorations",
                "products": [],
            })
        );
        assert_eq!(fingerprint(&desired), fingerprint(&spec.desired()));
    }

    #[test]
    fn invalid_features_are_refused_naming_the_key() {
        let eleven: String = (0..11).map(product).collect();
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "an empty features table",
                "name = \"x\"\n[business_profile]\n[features]\n".into(),
                "features: the table names no feature",
            ),
            (
                "enabled without products",
                with_products(""),
                "features.subscription_update.products: an enabled subscription update needs the products",
            ),
            (
                "eleven products",
                with_products(&eleven),
                "features.subscription_update.products: Stripe allows at most 10 products, the file lists 11",
            ),
            (
                "a product listed twice",
                with_products(&format!("{}{}", product(1), product(1))),
                "features.subscription_update.products[1].product: \"prod_1\" is listed twice",
            ),
            (
                "a product without prices",
                with_products("\n[[features.subscription_update.products]]\nproduct = \"prod_1\"\nprices = []\n"),
                "features.subscription_update.products[0].prices: must list price_… ids",
            ),
            (
                "a price where the product goes",
                with_products("\n[[features.subscription_update.products]]\nproduct = \"price_1\"\nprices = [\"price_1\"]\n"),
                "features.subscription_update.products[0].product: must be a prod_… id",
            ),
        ];
        for (what, text, expected) in cases {
            let error = PortalSpec::parse(&text).expect_err(what).to_string();
            assert!(error.starts_with(expected), "{what}: {error}");
        }
        // Ten products, and products listed while the feature is off, are fine.
        let ten: String = (0..10).map(product).collect();
        PortalSpec::parse(&with_products(&ten)).unwrap();
        PortalSpec::parse(&format!("{EXAMPLE}{}", product(1))).unwrap();
    }

    #[test]
    fn create_sends_the_required_empty_reason_options_and_leaves_other_empties_out() {
        let text = EXAMPLE.replace(
            "[features.subscription_cancel.cancellation_reason]\nenabled = true",
            "[features.subscription_cancel.cancellation_reason]\nenabled = false",
        );
        let text = text.replace(
            "options = [\"too_expensive\", \"missing_features\", \"switched_service\", \"unused\", \"other\"]",
            "options = []",
        );
        let params = PortalSpec::parse(&text).unwrap().create_params();
        assert_eq!(
            params["features"]["subscription_cancel"]["cancellation_reason"],
            json!({ "enabled": false, "options": "" })
        );
        // Nothing empty is sent otherwise: the policy URLs cannot be `''` on create.
        assert_eq!(
            params["business_profile"],
            json!({ "headline": "Manage your subscription and billing details" })
        );
        assert!(params.get("default_return_url").is_none());
        assert_eq!(
            params["features"]["subscription_update"],
            json!({
                "enabled": false,
                "default_allowed_updates": ["price"],
                "proration_behavior": "create_prorations",
            })
        );
        let body = crate::stripe::form::encode(&crate::stripe::form::form_pairs(&params));
        assert!(
            body.contains("features[subscription_cancel][cancellation_reason][options]=&"),
            "{body}"
        );
    }

    #[test]
    fn update_sends_an_explicit_empty_for_every_field_the_file_leaves_out() {
        let spec =
            PortalSpec::parse("[business_profile]\n[features.invoice_history]\nenabled = true\n")
                .unwrap();
        assert_eq!(
            spec.update_params(),
            json!({
                "business_profile": {
                    "headline": "",
                    "privacy_policy_url": "",
                    "terms_of_service_url": "",
                },
                "default_return_url": "",
                "features": {
                    "customer_update": { "enabled": false, "allowed_updates": "" },
                    "invoice_history": { "enabled": true },
                    "payment_method_update": { "enabled": false },
                    "subscription_cancel": {
                        "enabled": false,
                        "mode": "at_period_end",
                        "proration_behavior": "none",
                        "cancellation_reason": { "enabled": false, "options": "" },
                    },
                    "subscription_update": {
                        "enabled": false,
                        "default_allowed_updates": "",
                        "proration_behavior": "none",
                        "products": "",
                    },
                },
                "metadata": { "billsync_name": "default" },
            })
        );
    }

    /// Stripe's copy of what `spec` says, as a retrieve returns it (with fields billsync does
    /// not model).
    fn live_copy(spec: &PortalSpec) -> Value {
        let mut live = spec.desired();
        live["id"] = json!("bpc_1");
        live["active"] = json!(true);
        live["login_page"] = json!({ "enabled": false, "url": null });
        live["metadata"]["set_elsewhere"] = json!("kept");
        live["features"]["subscription_update"]["schedule_at_period_end"] =
            json!({ "conditions": [] });
        live
    }

    #[test]
    fn drift_names_each_modeled_field_that_differs_and_nothing_else() {
        let spec =
            PortalSpec::parse(&with_products(&format!("{}{}", product(1), product(2)))).unwrap();
        let live = live_copy(&spec);
        assert_eq!(spec.drift(&live), Vec::<String>::new());

        // Reordered lists, Stripe's null for an empty list, and unmodeled fields are no drift.
        let mut same = live.clone();
        same["features"]["customer_update"]["allowed_updates"] =
            json!(["tax_id", "address", "phone", "name", "email"]);
        same["features"]["subscription_update"]["products"] = json!([
            { "product": "prod_2", "prices": ["price_2b", "price_2a"],
              "adjustable_quantity": { "enabled": false, "maximum": null, "minimum": 1 } },
            { "product": "prod_1", "prices": ["price_1a", "price_1b"] },
        ]);
        same["features"]["subscription_update"]["schedule_at_period_end"] =
            json!({ "conditions": [{ "type": "shortening_interval" }] });
        same["business_profile"]["privacy_policy_url"] = Value::Null;
        same.as_object_mut().unwrap().remove("default_return_url");
        assert_eq!(spec.drift(&same), Vec::<String>::new());

        let mut edited = live;
        edited["business_profile"]["headline"] = json!("Edited in the Dashboard");
        edited["business_profile"]["terms_of_service_url"] = json!("https://x.example/tos");
        edited["features"]["invoice_history"]["enabled"] = json!(false);
        edited["features"]["customer_update"]["allowed_updates"] = json!(["email", "shipping"]);
        edited["features"]["subscription_cancel"]["cancellation_reason"]["options"] = json!([]);
        edited["features"]["subscription_update"]["products"][1]["prices"] = json!(["price_2a"]);
        edited["metadata"]["billsync_name"] = json!("other");
        assert_eq!(
            spec.drift(&edited),
            [
                "business_profile.headline",
                "business_profile.terms_of_service_url",
                "features.customer_update.allowed_updates",
                "features.invoice_history.enabled",
                "features.subscription_cancel.cancellation_reason.options",
                "features.subscription_update.products",
                "metadata.billsync_name",
            ]
        );
    }
}
