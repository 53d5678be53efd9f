//! Tests that need the process to themselves, run one at a time (`one_at_a_time`): the metrics
//! recorder is process-wide and observability asserts exact deltas, and postgres_restart stops
//! the machine's Postgres.

/// The shared helpers this binary uses (`tests/support/`): only these pieces, so none is dead.
#[macro_use]
#[path = "../support"]
mod support {
    #[path = "stores.rs"]
    mod stores;
    pub use stores::*;
    #[path = "app.rs"]
    mod app;
    pub use app::*;
    #[path = "process.rs"]
    pub mod process;
}

/// Held for the whole of each test of this binary, so none runs beside another.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ALONE.lock().await
}

mod observability;
mod postgres_restart;
