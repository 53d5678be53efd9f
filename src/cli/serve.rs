//! `billsync serve`: the composition root, run until SIGINT or SIGTERM.

use crate::{app::Application, config::Config, http};

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Signals first: from the moment the port answers, SIGTERM means a clean stop.
    let stopped = http::shutdown_signal()
        .map_err(|e| anyhow::anyhow!("cannot take over SIGINT and SIGTERM: {e}"))?;
    Application::build(&config)
        .await?
        .run_until_stopped(stopped)
        .await
}
