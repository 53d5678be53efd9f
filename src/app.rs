//! The composition root: the one place that puts a serving billsync together — the database
//! (migrated, and claimed for serving), the Stripe client, the request state, the listener,
//! and the background workers — and runs it until shut down. `billsync serve` and the tests'
//! `TestApp` both start the service through [`Application`], so the tests exercise the
//! production wiring.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    config::{Config, ServerLimits},
    http::{self, AppState},
    store::{self, Store},
    stripe::StripeClient,
};

/// How long the workers may take to finish the job in hand once the server has stopped.
const WORKERS_STOP: Duration = Duration::from_secs(15);

/// A billsync ready to serve: its listener is bound, so its address is known before it runs.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    limits: ServerLimits,
    run_workers: bool,
    deliverer: crate::app_events::delivery::Deliverer,
}

impl Application {
    /// Everything `billsync serve` does before it answers its first request.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        // Validate everything before touching the database or the network.
        let stripe = stripe_client(config)?;
        let store = open_store(config).await?;
        store
            .claim_serving()
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve the database: {e}"))?;
        Self::assemble(config, store, stripe).await
    }

    /// [`build`](Self::build) on a database the caller opened (and migrated): tests pass a
    /// fresh one per test, or one that is down. Whoever opened it decides whether this
    /// instance serves it alone (`Store::claim_serving`), so tests can also run two
    /// instances on one SQLite file.
    pub async fn build_with_store(config: &Config, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        let stripe = stripe_client(config)?;
        Self::assemble(config, store, stripe).await
    }

    async fn assemble(
        config: &Config,
        store: Arc<dyn Store>,
        stripe: StripeClient,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        warn_about_disabled_routes(config);
        // The bound address, so that `--listen 127.0.0.1:0` tells its port.
        let bound = listener.local_addr().unwrap_or(config.listen);
        tracing::info!(
            listen = %bound,
            database = store.backend(),
            stripe_api = %config.stripe.api_base,
            "billsync serving"
        );
        let deliverer = crate::app_events::delivery::Deliverer::new(
            store.clone(),
            &config.app_events,
            config.webhooks.retention,
        );
        Ok(Self {
            listener,
            state: AppState::new(config, store, stripe),
            limits: config.server,
            run_workers: config.run_workers,
            deliverer,
        })
    }

    /// The bound address (the port the OS chose, when the configuration says port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then lets in-flight requests and the workers' jobs
    /// in hand finish. Dropped before then, it stops everything it started.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            listener,
            state,
            limits,
            run_workers,
            deliverer,
        } = self;
        let (stop_workers, workers_stopping) = watch::channel(false);
        let workers = if run_workers {
            Workers(vec![
                tokio::spawn(state.worker.clone().run(workers_stopping.clone())),
                tokio::spawn(state.applier.clone().run(workers_stopping.clone())),
                tokio::spawn(crate::jobs::plan_announcements::announce_changed_plans(
                    state.store.clone(),
                    workers_stopping.clone(),
                )),
                tokio::spawn(deliverer.run(workers_stopping)),
            ])
        } else {
            tracing::info!(
                "BILLSYNC_RUN_WORKERS=false: serving HTTP only; events are stored for other \
                 instances to apply, profile pushes for them to send"
            );
            Workers(Vec::new())
        };
        http::server::serve(listener, http::app(state), limits, shutdown).await?;
        // Let the job in hand finish; an unfinished one is reclaimed when its lease runs out.
        let _ = stop_workers.send(true);
        if tokio::time::timeout(WORKERS_STOP, workers.join())
            .await
            .is_err()
        {
            tracing::warn!("background workers did not stop in time");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The background tasks of a running application; aborted if it is dropped before they end,
/// so a test's server leaves no worker polling its database behind.
struct Workers(Vec<JoinHandle<()>>);

impl Workers {
    async fn join(mut self) {
        for task in &mut self.0 {
            let _ = task.await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

fn warn_about_disabled_routes(config: &Config) {
    if config.admin_api_key.is_none() {
        tracing::warn!("BILLSYNC_ADMIN_API_KEY is not set: admin routes answer 503");
    }
    if config.jwt.secret.is_none() && config.jwt.jwks_url.is_none() {
        tracing::warn!(
            "neither BILLSYNC_JWT_SECRET nor BILLSYNC_JWKS_URL is set: user routes answer 503"
        );
    } else if config.app_url.is_none() {
        tracing::warn!("APP_URL is not set: portal sessions answer 503");
    }
}

/// The Stripe client, once the key is checked for shape (one clear line when it is not).
pub fn stripe_client(config: &Config) -> anyhow::Result<StripeClient> {
    Ok(StripeClient::new(
        &config.stripe,
        config.stripe_secret_key()?,
    )?)
}

/// Opens the configured database and brings its schema up to date.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store = store::connect_with(config.database_url.expose(), &config.store_options())
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the database: {e}"))?;
    store
        .migrate()
        .await
        .map_err(|e| anyhow::anyhow!("cannot migrate the database: {e}"))?;
    Ok(store)
}
