//! `billsync events …`: stored webhook events.

use clap::Subcommand;

use crate::{app::open_store, config::Config};

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Queue stored events to be applied again (by a running `billsync serve`).
    Replay {
        /// Every failed event.
        #[arg(long, conflicts_with = "id", required_unless_present = "id")]
        failed: bool,
        /// One event, by id (evt_…).
        #[arg(long)]
        id: Option<String>,
    },
}

pub async fn run(command: EventsCommand, config: Config) -> anyhow::Result<()> {
    let EventsCommand::Replay { failed, id } = command;
    let store = open_store(&config).await?;
    if failed {
        let count = store.replay_failed_events().await?;
        println!("{count} failed events queued again");
    } else if let Some(id) = id {
        store
            .replay_event(&id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no event {id}"))?;
        println!("{id} queued again");
    }
    Ok(())
}
