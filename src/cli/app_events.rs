//! `billsync app-events …`: the app's webhook secret.

use clap::Subcommand;

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum AppEventsCommand {
    /// Print a fresh Standard Webhooks secret (whsec_ + 32 random bytes, base64), for
    /// BILLSYNC_APP_WEBHOOK_SECRET and the app's verifier. To rotate, set both the new and the
    /// old one (comma-separated, new first) until the app verifies with the new one.
    NewSecret,
}

pub async fn run(command: AppEventsCommand, _config: Config) -> anyhow::Result<()> {
    match command {
        AppEventsCommand::NewSecret => {
            println!("{}", crate::standard_webhooks::new_secret());
            Ok(())
        }
    }
}
