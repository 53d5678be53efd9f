//! `billsync customer …`: a user's Stripe customer.

use clap::Subcommand;

use crate::{
    app::{open_store, stripe_client},
    config::Config,
    domain::{Email, UserId},
    http::AppState,
    store::{Store, UserUpsert},
};

#[derive(Debug, Subcommand)]
pub enum CustomerCommand {
    /// Find or create the user's Stripe customer and print its id.
    Resolve {
        /// The application's user id.
        #[arg(long, env = "BILLSYNC_USER_ID")]
        user: String,
        /// Creates the user with this (unverified) email if missing; updates it if it differs.
        #[arg(long, env = "BILLSYNC_USER_EMAIL")]
        email: Option<String>,
    },
}

pub async fn run(command: CustomerCommand, config: Config) -> anyhow::Result<()> {
    let CustomerCommand::Resolve { user, email } = command;
    let stripe = stripe_client(&config)?;
    let user_id = UserId::parse(&user)?;
    let email = email.as_deref().map(Email::parse).transpose()?;
    let store = open_store(&config).await?;
    ensure_user(store.as_ref(), &user_id, email).await?;
    let state = AppState::new(&config, store, stripe);
    let resolved = state
        .resolver
        .resolve(&user_id)
        .await
        .map_err(|e| match e {
            crate::customers::ResolveError::UserNotFound => {
                anyhow::anyhow!("user {user_id} not found (pass --email to create it)")
            }
            other => other.into(),
        })?;
    println!("{}", resolved.customer_id);
    tracing::info!(source = resolved.source.as_str(), "resolved");
    Ok(())
}

async fn ensure_user(store: &dyn Store, id: &UserId, email: Option<Email>) -> anyhow::Result<()> {
    let Some(email) = email else { return Ok(()) };
    let existing = store.get_user(id).await?;
    let upsert = match existing {
        Some(user) if user.email == email => return Ok(()),
        // A changed email is no longer verified.
        Some(user) => UserUpsert {
            id: id.clone(),
            email,
            email_verified: false,
            first_name: user.first_name,
            last_name: user.last_name,
            phone: user.phone,
        },
        None => UserUpsert {
            id: id.clone(),
            email,
            email_verified: false,
            first_name: None,
            last_name: None,
            phone: None,
        },
    };
    store.upsert_user(&upsert).await?;
    Ok(())
}
