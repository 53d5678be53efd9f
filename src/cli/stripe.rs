//! `billsync stripe …`: the Stripe account's side of billsync's setup.

use clap::Subcommand;

use crate::{
    app::stripe_client,
    config::Config,
    stripe_setup::{self, Outcome},
};

#[derive(Debug, Subcommand)]
pub enum StripeCommand {
    /// Create the webhook endpoint for URL, or find it and make it send exactly the events
    /// billsync handles, enabled. On create, prints the signing secret (Stripe shows it once).
    Setup {
        /// Where Stripe sends events: billsync's /api/webhooks/stripe as the internet sees it.
        #[arg(long)]
        url: String,
        /// Change nothing: report how the endpoint differs (missing or extra events, another
        /// API version, disabled) and exit non-zero if it does, or if there is none.
        #[arg(long)]
        check: bool,
    },
}

pub async fn run(command: StripeCommand, config: Config) -> anyhow::Result<()> {
    let StripeCommand::Setup { url, check } = command;
    let stripe = stripe_client(&config)?;
    let api_version = &config.stripe.api_version;
    if check {
        let Some((id, drift)) = stripe_setup::check(&stripe, &url, api_version).await? else {
            anyhow::bail!(
                "no webhook endpoint has the URL {url}: run `billsync stripe setup --url {url}`"
            );
        };
        println!(
            "{}",
            serde_json::json!({"id": id, "url": url, "in_sync": drift.is_empty(), "drift": drift})
        );
        if !drift.is_empty() {
            anyhow::bail!("webhook endpoint {id} differs: {}", drift.summary());
        }
        return Ok(());
    }
    match stripe_setup::setup(&stripe, &url, api_version).await? {
        Outcome::Created { id, secret } => {
            println!("created webhook endpoint {id} for {url} (API version {api_version})");
            match secret {
                // Standard output only, never a log: the operator copies it from here.
                Some(secret) => println!(
                    "its signing secret, which Stripe shows only now; set it as STRIPE_WEBHOOK_SECRET:\n{}",
                    secret.expose()
                ),
                None => println!(
                    "Stripe's answer carried no signing secret: reveal it in the Dashboard and set it as STRIPE_WEBHOOK_SECRET"
                ),
            }
        }
        Outcome::Updated { id, fixed } => {
            println!(
                "updated webhook endpoint {id} for {url}: it was {}",
                fixed.summary()
            );
            println!("its signing secret is unchanged");
        }
        Outcome::InSync { id } => {
            println!("webhook endpoint {id} for {url} is already as billsync needs it");
        }
    }
    Ok(())
}
