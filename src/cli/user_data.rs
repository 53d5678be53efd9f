//! `billsync export` and `billsync erase`: a user's data, the way the user routes serve them.

use crate::{
    app::{open_store, stripe_client},
    config::Config,
    domain::UserId,
    http::AppState,
};

/// Prints everything billsync holds about the user as JSON.
pub async fn export(config: Config, user: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let stripe = stripe_client(&config)?;
    let user_id = UserId::parse(user)?;
    let store = open_store(&config).await?;
    let found = store
        .get_user(&user_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("user {user_id} not found"))?;
    let mut chunks = Box::pin(crate::gdpr::export(store, &stripe, found).await?);
    let mut stdout = tokio::io::stdout();
    while let Some(chunk) = futures_util::StreamExt::next(&mut chunks).await {
        stdout.write_all(&chunk?).await?;
    }
    stdout.write_all(b"\n").await?;
    stdout.flush().await?;
    Ok(())
}

/// Runs the erasure saga now; a failed Stripe step is left for `serve` to retry.
pub async fn erase(config: Config, user: &str, delete_stripe_customer: bool) -> anyhow::Result<()> {
    let stripe = stripe_client(&config)?;
    let user_id = UserId::parse(user)?;
    let store = open_store(&config).await?;
    let state = AppState::new(&config, store, stripe);
    match state
        .worker
        .erase_now(&user_id, delete_stripe_customer)
        .await?
    {
        crate::jobs::ErasureStatus::Completed => println!("erased"),
        crate::jobs::ErasureStatus::Pending => {
            println!("pending: a Stripe step failed; `billsync serve` will retry it");
        }
    }
    Ok(())
}
