//! The start-up pass after a plans file change: every user whose computed plan differs from
//! what they were last told hears `plan.changed`, once. It runs beside the workers, page by
//! page, and is safe to run on several instances at once (each user's row lock orders them);
//! interrupted, it starts again at the next start-up, and users already told hear nothing.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{retry::RetryPolicy, store::Store};

/// Users per transaction: each page locks its users' rows while it computes their plans.
const PAGE: u32 = 500;

/// Waits between failed pages (the database down), doubling up to a minute.
const RETRY: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    backoff_base: Duration::from_secs(1),
    backoff_max: Duration::from_secs(60),
};

/// Runs the pass if the plans file is not the one last announced; returns when it is done or
/// `stopping` turns true.
pub async fn announce_changed_plans(store: Arc<dyn Store>, mut stopping: watch::Receiver<bool>) {
    let mut after = None;
    let mut failures = 0u32;
    let mut checked = false;
    loop {
        if *stopping.borrow() {
            return;
        }
        let step = async {
            if !checked {
                if store.plans_file_announced().await? {
                    return Ok(None);
                }
                tracing::info!("the plans file changed: telling each user whose plan it changes");
                checked = true;
            }
            match store.announce_plans_page(after.as_ref(), PAGE).await? {
                Some(last) => Ok(Some(Some(last))),
                None => store.record_plans_file_announced().await.map(|()| None),
            }
        };
        match step.await {
            Ok(Some(last)) => {
                after = last;
                failures = 0;
            }
            Ok(None) => {
                if checked {
                    tracing::info!("every user has been told their plan under this plans file");
                }
                return;
            }
            Err(e) => {
                failures += 1;
                let wait = RETRY.backoff(failures, None);
                tracing::warn!(error = %e, retry_in = ?wait, "announcing the plans file failed");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stopping.changed() => return,
                }
            }
        }
    }
}
