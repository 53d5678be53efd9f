//! Plans as code: a TOML file maps Stripe prices to plans, each with its features and limits.
//! A user's plan is the highest plan that a live item of any of their subscriptions grants,
//! else the default plan. Computed from billsync's subscription mirror, never from Stripe.
//!
//! ```toml
//! default_plan = "free"
//! # Statuses that keep a plan besides active and trialing.
//! grace_statuses = ["past_due"]
//!
//! [[plans]]            # listed from lowest to highest
//! id = "free"
//! features = ["projects"]
//! limits = { projects = 1 }
//!
//! [[plans]]
//! id = "pro"
//! prices = ["price_1Pro", "lookup:pro_monthly"]
//! features = ["projects", "exports"]
//! limits = { projects = 50, seats = 5 }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::domain::SubscriptionMirror;

/// Statuses Stripe gives a subscription, for checking `grace_statuses`.
const STRIPE_STATUSES: &[&str] = &[
    "incomplete",
    "incomplete_expired",
    "trialing",
    "active",
    "past_due",
    "canceled",
    "unpaid",
    "paused",
];

/// What a plan grants, as the billing read and `plan.changed` show it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Plan {
    pub id: String,
    pub features: Vec<String>,
    /// Numbers by name (`projects = 10`).
    #[schema(value_type = BTreeMap<String, f64>)]
    pub limits: BTreeMap<String, serde_json::Number>,
}

/// A price as the plans file names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PriceRef {
    Id(String),
    LookupKey(String),
}

impl std::fmt::Display for PriceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Id(id) => f.write_str(id),
            Self::LookupKey(key) => write!(f, "lookup:{key}"),
        }
    }
}

/// The price of a subscription item, as far as plans need it.
#[derive(Debug, Clone, Copy)]
pub struct ItemPrice<'a> {
    pub id: Option<&'a str>,
    pub lookup_key: Option<&'a str>,
}

/// A validated plans file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plans {
    /// Lowest first.
    plans: Vec<Plan>,
    /// The prices each plan lists, by the plan's index.
    prices: Vec<Vec<PriceRef>>,
    default_plan: Option<usize>,
    grace_statuses: Vec<String>,
    by_price: HashMap<PriceRef, usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlansFile {
    #[serde(default)]
    default_plan: Option<String>,
    #[serde(default)]
    grace_statuses: Vec<String>,
    #[serde(default)]
    plans: Vec<PlanEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanEntry {
    id: String,
    #[serde(default)]
    prices: Vec<String>,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    limits: BTreeMap<String, toml::Value>,
}

/// Why a plans file is refused: the key at fault, and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{key}: {problem}")]
pub struct PlansError {
    pub key: String,
    pub problem: String,
}

fn refuse(key: impl Into<String>, problem: impl Into<String>) -> PlansError {
    PlansError {
        key: key.into(),
        problem: problem.into(),
    }
}

impl Plans {
    /// Parses and validates a plans file's text.
    pub fn parse(text: &str) -> Result<Self, PlansError> {
        let file: PlansFile = toml::from_str(text).map_err(|e| {
            // toml names the offending key in its message; keep its first line.
            let message = e
                .message()
                .lines()
                .next()
                .unwrap_or("not valid TOML")
                .to_owned();
            let at = e
                .span()
                .map(|span| line_of(text, span.start))
                .map_or_else(String::new, |line| format!("line {line}"));
            refuse(at, message)
        })?;
        let mut plans = Vec::with_capacity(file.plans.len());
        let mut prices = Vec::with_capacity(file.plans.len());
        let mut by_price = HashMap::new();
        let mut ids = HashSet::new();
        for (index, entry) in file.plans.into_iter().enumerate() {
            let at = format!("plans[{index}]");
            if entry.id.trim().is_empty() {
                return Err(refuse(format!("{at}.id"), "must not be empty"));
            }
            if !ids.insert(entry.id.clone()) {
                return Err(refuse(
                    format!("{at}.id"),
                    format!("plan `{}` is listed twice", entry.id),
                ));
            }
            let mut listed = Vec::new();
            for (p, raw) in entry.prices.iter().enumerate() {
                let price = parse_price(raw)
                    .ok_or_else(|| refuse(format!("{at}.prices[{p}]"), not_a_price(raw)))?;
                if let Some(&other) = by_price.get(&price) {
                    let other: &Plan = &plans[other];
                    return Err(refuse(
                        format!("{at}.prices[{p}]"),
                        format!("{price} already grants plan `{}`", other.id),
                    ));
                }
                by_price.insert(price.clone(), index);
                listed.push(price);
            }
            let mut limits = BTreeMap::new();
            for (name, value) in entry.limits {
                let number = match value {
                    toml::Value::Integer(n) => serde_json::Number::from(n),
                    toml::Value::Float(f) => serde_json::Number::from_f64(f)
                        .ok_or_else(|| refuse(format!("{at}.limits.{name}"), "must be finite"))?,
                    other => {
                        return Err(refuse(
                            format!("{at}.limits.{name}"),
                            format!("must be a number, not a {}", other.type_str()),
                        ))
                    }
                };
                limits.insert(name, number);
            }
            plans.push(Plan {
                id: entry.id,
                features: entry.features,
                limits,
            });
            prices.push(listed);
        }
        let default_plan = match file.default_plan {
            None => None,
            Some(id) => Some(
                plans
                    .iter()
                    .position(|p| p.id == id)
                    .ok_or_else(|| refuse("default_plan", format!("no plan `{id}` is listed")))?,
            ),
        };
        for (index, status) in file.grace_statuses.iter().enumerate() {
            if !STRIPE_STATUSES.contains(&status.as_str()) {
                return Err(refuse(
                    format!("grace_statuses[{index}]"),
                    format!(
                        "`{status}` is not a Stripe subscription status ({})",
                        STRIPE_STATUSES.join(", ")
                    ),
                ));
            }
        }
        Ok(Self {
            plans,
            prices,
            default_plan,
            grace_statuses: file.grace_statuses,
            by_price,
        })
    }

    /// No plans file: no plan for anyone.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id == id)
    }

    /// Every price the file names, with the plan it grants.
    pub fn prices(&self) -> impl Iterator<Item = (&PriceRef, &Plan)> {
        self.prices
            .iter()
            .zip(&self.plans)
            .flat_map(|(prices, plan)| prices.iter().map(move |price| (price, plan)))
    }

    /// The plan of a user without a live subscription.
    pub fn default_plan(&self) -> Option<&Plan> {
        self.default_plan.map(|i| &self.plans[i])
    }

    /// The file's content in one stable text: reformatting, comments and key order do not
    /// change it; any change to what it grants does.
    pub fn canonical(&self) -> String {
        let plans: Vec<_> = self
            .plans
            .iter()
            .zip(&self.prices)
            .map(|(plan, prices)| {
                let prices: Vec<String> = prices.iter().map(ToString::to_string).collect();
                serde_json::json!({
                    "id": plan.id, "prices": prices,
                    "features": plan.features, "limits": plan.limits,
                })
            })
            .collect();
        serde_json::json!({
            "default_plan": self.default_plan().map(|p| &p.id),
            "grace_statuses": self.grace_statuses,
            "plans": plans,
        })
        .to_string()
    }

    /// Whether a subscription in this status grants its plan.
    pub fn keeps_plan(&self, status: &str) -> bool {
        matches!(status, "active" | "trialing") || self.grace_statuses.iter().any(|s| s == status)
    }

    /// The plan one item's price grants, if any.
    pub fn plan_of_price(&self, price: ItemPrice<'_>) -> Option<&Plan> {
        self.index_of_price(price).map(|i| &self.plans[i])
    }

    fn index_of_price(&self, price: ItemPrice<'_>) -> Option<usize> {
        let by_id = price
            .id
            .and_then(|id| self.by_price.get(&PriceRef::Id(id.to_owned())));
        let by_key = || {
            price
                .lookup_key
                .and_then(|key| self.by_price.get(&PriceRef::LookupKey(key.to_owned())))
        };
        by_id.or_else(by_key).copied()
    }

    /// The plan of a user with these subscriptions: the highest that a live item grants, else
    /// the default.
    pub fn plan_for(&self, subscriptions: &[SubscriptionMirror]) -> Option<&Plan> {
        subscriptions
            .iter()
            .filter(|s| self.keeps_plan(&s.status))
            .flat_map(|s| &s.items)
            .filter_map(|item| {
                self.index_of_price(ItemPrice {
                    id: item.price_id.as_deref(),
                    lookup_key: item.lookup_key.as_deref(),
                })
            })
            .max()
            .or(self.default_plan)
            .map(|i| &self.plans[i])
    }

    /// The plan one subscription grants on its own (its highest live item), for the billing
    /// read's per-subscription `plan`.
    pub fn plan_of_subscription(&self, subscription: &SubscriptionMirror) -> Option<&Plan> {
        if !self.keeps_plan(&subscription.status) {
            return None;
        }
        subscription
            .items
            .iter()
            .filter_map(|item| {
                self.index_of_price(ItemPrice {
                    id: item.price_id.as_deref(),
                    lookup_key: item.lookup_key.as_deref(),
                })
            })
            .max()
            .map(|i| &self.plans[i])
    }
}

/// A plan as `plan.changed` and the `user_plans` row carry it.
pub fn plan_json(plan: Option<&Plan>) -> Option<serde_json::Value> {
    plan.map(|p| serde_json::to_value(p).expect("a plan serializes"))
}

/// What a user was last told about their plan (their `user_plans` row).
#[derive(Debug, Clone, PartialEq)]
pub struct Announced {
    pub plan_id: Option<String>,
    /// The plan as announced; `None` on rows written before contents were recorded.
    pub plan: Option<serde_json::Value>,
}

/// Whether a user last told `announced` (no row: told `unrecorded`, the default plan as last
/// announced to everyone) must hear `computed`: `Some(previous plan id)` when they must.
/// A plan whose id is unchanged counts as changed when its features or limits are.
pub fn announcement(
    announced: Option<&Announced>,
    unrecorded: Option<&serde_json::Value>,
    computed: Option<&serde_json::Value>,
) -> Option<Option<String>> {
    let id_of =
        |plan: Option<&serde_json::Value>| plan.and_then(|p| p["id"].as_str()).map(str::to_owned);
    match announced {
        None => (unrecorded != computed).then(|| id_of(unrecorded)),
        Some(row) => {
            let changed = row.plan_id != id_of(computed)
                || row.plan.as_ref().is_some_and(|told| Some(told) != computed);
            changed.then(|| row.plan_id.clone())
        }
    }
}

fn parse_price(raw: &str) -> Option<PriceRef> {
    if let Some(key) = raw.strip_prefix("lookup:") {
        return (!key.is_empty()).then(|| PriceRef::LookupKey(key.to_owned()));
    }
    (raw.starts_with("price_") && raw.len() > "price_".len() && !raw.contains(char::is_whitespace))
        .then(|| PriceRef::Id(raw.to_owned()))
}

fn not_a_price(raw: &str) -> String {
    format!("`{raw}` is neither a price id (price_…) nor lookup:<lookup_key>")
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests;
