//! billsync's outbox: the worker with every kind of job registered (profile pushes, erasure
//! sagas), the one `serve` runs and the erasure routes start sagas on.

use std::sync::Arc;

use tokio::sync::watch;

use super::{
    erase::{self, Erase, ErasureStatus},
    push_profile::PushProfile,
    worker::Worker,
};
use crate::{
    config::{OutboxConfig, Secret},
    domain::UserId,
    gdpr::Tombstones,
    store::{JobKind, JobOutcome, OutboxJob, Store, StoreError},
    stripe::StripeClient,
};

#[derive(Clone)]
pub struct OutboxWorker {
    worker: Worker,
    store: Arc<dyn Store>,
    stripe: StripeClient,
    config: OutboxConfig,
    tombstones: Arc<Tombstones>,
}

impl OutboxWorker {
    pub fn new(store: Arc<dyn Store>, stripe: StripeClient, config: OutboxConfig) -> Self {
        Self::assemble(store, stripe, config, Arc::new(Tombstones::new(None)))
    }

    fn assemble(
        store: Arc<dyn Store>,
        stripe: StripeClient,
        config: OutboxConfig,
        tombstones: Arc<Tombstones>,
    ) -> Self {
        let worker = Worker::new(store.clone(), config.clone())
            .register(
                JobKind::PushProfile,
                Arc::new(PushProfile::new(store.clone(), stripe.clone())),
            )
            .register(
                JobKind::Erase,
                Arc::new(Erase::new(
                    store.clone(),
                    stripe.clone(),
                    tombstones.clone(),
                )),
            );
        Self {
            worker,
            store,
            stripe,
            config,
            tombstones,
        }
    }

    /// Keys the erasure tombstones with `pepper` (`BILLSYNC_ERASURE_PEPPER`) instead of the
    /// one kept in the database.
    pub fn with_erasure_pepper(self, pepper: Option<Secret>) -> Self {
        Self::assemble(
            self.store,
            self.stripe,
            self.config,
            Arc::new(Tombstones::new(pepper)),
        )
    }

    /// The tombstones the erasures write, for the user routes to check tokens against.
    pub fn tombstones(&self) -> &Tombstones {
        &self.tombstones
    }

    /// Runs until `shutdown` turns true; the job in hand is finished first.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        self.worker.run(shutdown).await
    }

    /// Claims and runs one batch of due jobs; returns how many it ran.
    pub async fn tick(&self) -> Result<usize, StoreError> {
        self.worker.tick().await
    }

    /// Runs one claimed job and says how it ended.
    pub async fn run_job(&self, job: &OutboxJob) -> JobOutcome {
        self.worker.run_job(job).await
    }

    /// Starts (or joins) the user's erasure and runs it now if no worker holds it.
    pub async fn erase_now(
        &self,
        user_id: &UserId,
        delete_customer: bool,
    ) -> Result<ErasureStatus, StoreError> {
        erase::erase_now(&self.worker, user_id, delete_customer).await
    }
}
