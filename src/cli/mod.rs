//! The `billsync` command line: the commands and their arguments here, each command's work in
//! its own file. Every flag also reads its environment variable.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigArgs};

mod app_events;
mod customer;
mod events;
mod migrate;
pub mod plans;
mod portal;
mod reconcile;
mod serve;
mod stripe;
mod user_data;
mod users;

pub use app_events::AppEventsCommand;
pub use customer::CustomerCommand;
pub use events::EventsCommand;
pub use portal::PortalCommand;
pub use stripe::StripeCommand;
pub use users::UsersCommand;

#[derive(Debug, Parser)]
#[command(
    name = "billsync",
    version,
    about = "Keeps your users and their Stripe customers in sync"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (migrates the database first).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Users: bulk import.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Customer operations.
    #[command(subcommand)]
    Customer(CustomerCommand),
    /// Webhook events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Compare every Stripe customer with every user and link; report, and with --apply fix
    /// what is safe (link, unlink dangling, push drifted profiles). Never deletes a customer.
    Reconcile {
        /// Fix what is safe to fix.
        #[arg(long)]
        apply: bool,
        /// Write the full report (every finding) to this file as JSON.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// The billing-portal configuration, kept as code.
    #[command(subcommand)]
    Portal(PortalCommand),
    /// The plans file (BILLSYNC_PLANS_FILE) against Stripe.
    #[command(subcommand)]
    Plans(plans::PlansCommand),
    /// The Stripe account's side: the webhook endpoint billsync needs.
    #[command(subcommand)]
    Stripe(StripeCommand),
    /// Events towards the app (Standard Webhooks).
    #[command(subcommand, name = "app-events")]
    AppEvents(AppEventsCommand),
    /// Print the HTTP API's OpenAPI document (what `GET /openapi.json` serves), for
    /// generating clients.
    Openapi,
    /// Print everything billsync holds about a user as JSON (the GDPR export).
    Export {
        #[arg(long, env = "BILLSYNC_USER_ID")]
        user: String,
    },
    /// Erase a user: cancel subscriptions, scrub (or delete) the Stripe customer, delete local data.
    Erase {
        #[arg(long, env = "BILLSYNC_USER_ID")]
        user: String,
        /// Delete the Stripe customer instead of scrubbing it.
        #[arg(long, env = "BILLSYNC_DELETE_STRIPE_CUSTOMER")]
        delete_stripe_customer: bool,
    },
}

/// Parses arguments, runs the command, and turns any failure into one clear line on stderr.
pub async fn run() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("billsync: {err}");
            return ExitCode::FAILURE;
        }
    };
    crate::telemetry::init_logs(config.log_format, config.secret_values());
    match execute(cli.command, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("billsync: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve::run(config).await,
        Command::Openapi => {
            println!("{}", crate::http::openapi_document());
            Ok(())
        }
        Command::Migrate => migrate::run(config).await,
        Command::Users(command) => users::run(command, config).await,
        Command::Customer(command) => customer::run(command, config).await,
        Command::Events(command) => events::run(command, config).await,
        Command::Reconcile { apply, json } => reconcile::run(config, apply, json).await,
        Command::Portal(command) => portal::run(command, config).await,
        Command::AppEvents(command) => app_events::run(command, config).await,
        Command::Stripe(command) => stripe::run(command, config).await,
        Command::Plans(command) => plans::run(command, config).await,
        Command::Export { user } => user_data::export(config, &user).await,
        Command::Erase {
            user,
            delete_stripe_customer,
        } => user_data::erase(config, &user, delete_stripe_customer).await,
    }
}
