//! `billsync migrate`: brings the database's schema up to date and exits.

use crate::{app::open_store, config::Config};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let store = open_store(&config).await?;
    tracing::info!(backend = store.backend(), "migrations applied");
    Ok(())
}
