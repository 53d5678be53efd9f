//! `billsync reconcile`: compares every Stripe customer with every user and link, reports,
//! and with `--apply` fixes what is safe.

use crate::{
    app::{open_store, stripe_client},
    config::Config,
};

pub async fn run(
    config: Config,
    apply: bool,
    json: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use crate::reconcile::{self, Progress, RateLimiter};
    let stripe = stripe_client(&config)?;
    let store = open_store(&config).await?;
    let limiter = RateLimiter::per_second(config.stripe_rps);
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if terminal {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Some(bar)
    } else {
        None
    };
    let last_phase = std::sync::Mutex::new("");
    let observe = |p: &Progress| {
        let line = format!(
            "{}: {} Stripe customers in {} pages, {} users",
            p.phase, p.stripe_customers, p.stripe_pages, p.users
        );
        match &bar {
            Some(bar) => bar.set_message(line),
            None => {
                // Plain lines for logs: each phase, and every 10th page.
                let mut last = last_phase.lock().expect("progress lock");
                if *last != p.phase || (p.phase == "stripe" && p.stripe_pages.is_multiple_of(10)) {
                    eprintln!("{line}");
                    *last = p.phase;
                }
            }
        }
    };
    // Recorded like a run started over HTTP: one at a time across instances and commands.
    let id = reconcile::start_recorded(store.as_ref(), apply)
        .await?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "a reconciliation is already running (POST /v1/reconcile or another `billsync \
                 reconcile`); start this one when it has ended"
            )
        })?;
    eprintln!("run {id}");
    let report =
        reconcile::run_recorded(store.as_ref(), &stripe, &limiter, apply, &id, &observe).await?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if let Some(path) = &json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    print!("{}", report.table());
    let pushes = reconcile::queued_pushes(&report);
    if !pushes.is_empty() {
        // No server may be running: deliver the queued pushes now, at the same rate limit.
        let worker =
            crate::jobs::OutboxWorker::new(store.clone(), stripe.clone(), config.outbox.clone());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            limiter.acquire().await;
            worker.tick().await?;
            let waiting = store.queue_stats().await?.outbox_depth;
            if waiting == 0 {
                println!("{} profile pushes delivered", pushes.len());
                break;
            }
            if std::time::Instant::now() > deadline {
                println!(
                    "{waiting} outbox jobs still queued; a running billsync serve delivers them"
                );
                break;
            }
            tokio::time::sleep(config.outbox.poll_interval).await;
        }
    }
    Ok(())
}
