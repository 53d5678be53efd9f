//! `billsync plans check`: the plans file held against Stripe. Every price id must exist and
//! be active; every lookup key must name an active price. (Here, not in `plans`, because it
//! calls Stripe, and the Stripe client depends on the configuration that holds the plans.)

use std::collections::BTreeMap;

use clap::Subcommand;
use serde::Serialize;

use crate::{
    app::stripe_client,
    config::Config,
    plans::{Plans, PriceRef},
    stripe::{StripeClient, StripeError, MAX_LOOKUP_KEYS},
};

#[derive(Debug, Subcommand)]
pub enum PlansCommand {
    /// Resolve every price and lookup key of BILLSYNC_PLANS_FILE against Stripe (exists,
    /// active); print one JSON line per problem and exit non-zero if there is any.
    Check,
}

/// A price of the plans file that Stripe does not back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// As the file names it: `price_…` or `lookup:<key>`.
    pub price: String,
    pub plan: String,
    pub problem: String,
}

/// Asks Stripe about each price the file names: one retrieve per id, one list per ten
/// lookup keys.
pub async fn check(plans: &Plans, stripe: &StripeClient) -> Result<Vec<Finding>, StripeError> {
    let mut findings = Vec::new();
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    for (price, plan) in plans.prices() {
        let finding = |problem: &str| Finding {
            price: price.to_string(),
            plan: plan.id.clone(),
            problem: problem.to_owned(),
        };
        match price {
            PriceRef::Id(id) => match stripe.retrieve_price(id).await {
                Ok(found) if found.active => {}
                Ok(_) => findings.push(finding("archived in Stripe (active is false)")),
                Err(err) if err.is_not_found() => findings.push(finding("no such price in Stripe")),
                Err(err) => return Err(err),
            },
            PriceRef::LookupKey(key) => {
                keys.insert(key.clone(), plan.id.clone());
            }
        }
    }
    let wanted: Vec<String> = keys.keys().cloned().collect();
    for chunk in wanted.chunks(MAX_LOOKUP_KEYS) {
        let found = stripe.prices_by_lookup_keys(chunk).await?;
        for key in chunk {
            let active = found
                .iter()
                .any(|p| p.active && p.lookup_key.as_deref() == Some(key.as_str()));
            if !active {
                findings.push(Finding {
                    price: PriceRef::LookupKey(key.clone()).to_string(),
                    plan: keys[key].clone(),
                    problem: "no active price has this lookup key".into(),
                });
            }
        }
    }
    Ok(findings)
}

pub async fn run(command: PlansCommand, config: Config) -> anyhow::Result<()> {
    match command {
        PlansCommand::Check => {
            let plans = &config.app_events.plans;
            if plans.is_empty() {
                anyhow::bail!("BILLSYNC_PLANS_FILE is not set, or lists no plans");
            }
            let stripe = stripe_client(&config)?;
            let findings = check(plans, &stripe).await?;
            for finding in &findings {
                println!("{}", serde_json::to_string(finding)?);
            }
            if !findings.is_empty() {
                anyhow::bail!(
                    "{} price(s) of the plans file are not backed by Stripe",
                    findings.len()
                );
            }
            let count = plans.prices().count();
            println!("{}", serde_json::json!({"checked": count, "problems": 0}));
            Ok(())
        }
    }
}
