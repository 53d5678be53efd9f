//! `billsync serve`: the composition root, run until SIGINT or SIGTERM.

use crate::{app::Application, config::Config, http};

pub async fn run(config: Config) -> anyhow::Result<()> {
    Application::build(&config)
        .await?
        .run_until_stopped(http::shutdown_signal())
        .await
}
