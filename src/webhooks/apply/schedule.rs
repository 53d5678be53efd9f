//! The applier's loop: each tick leases the customers with due events (one instance per
//! customer), sends each down the batched or the one-by-one path, and releases them;
//! between ticks it pauses, and now and then prunes old events.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::watch;

use super::{batch, handlers::Handlers, one_by_one};
use crate::{
    config::OutboxConfig,
    retry::RetryPolicy,
    store::{Store, StoreError},
    stripe::StripeClient,
};

/// Customers applied one by one at the same time at most (their database round trips
/// overlap).
pub const MAX_CONCURRENT_CUSTOMERS: usize = 8;
/// The longest breather between ticks that found work (see `run`).
const BUSY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(100);
/// Events of one customer applied per lease.
const EVENTS_PER_CUSTOMER: u32 = 500;
/// Customers looked at per tick.
const CUSTOMERS_PER_TICK: u32 = 64;

#[derive(Clone)]
pub struct Applier {
    store: Arc<dyn Store>,
    stripe: StripeClient,
    holder: String,
    /// Failed events are retried as jobs are (configured with the outbox's attempts and
    /// backoff).
    retry: RetryPolicy,
    /// Between ticks that found nothing.
    poll_interval: std::time::Duration,
    /// How long a customer's lease keeps other instances off it.
    lease: std::time::Duration,
    retention: std::time::Duration,
    concurrency: usize,
}

impl Applier {
    pub fn new(
        store: Arc<dyn Store>,
        stripe: StripeClient,
        outbox: OutboxConfig,
        retention: std::time::Duration,
    ) -> Self {
        Self {
            store,
            stripe,
            holder: format!("applier-{}", uuid::Uuid::new_v4()),
            retry: RetryPolicy::from(&outbox),
            poll_interval: outbox.poll_interval,
            lease: outbox.lease,
            retention,
            concurrency: 1,
        }
    }

    /// Applies up to `customers` customers at once (at most `MAX_CONCURRENT_CUSTOMERS`). Each
    /// uses a pooled connection while it works, so keep it well under the pool's size.
    pub fn with_concurrency(mut self, customers: usize) -> Self {
        self.concurrency = customers.clamp(1, MAX_CONCURRENT_CUSTOMERS);
        self
    }

    /// Deletes applied and skipped events past the retention period.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        let cutoff = time::OffsetDateTime::now_utc() - self.retention;
        let pruned = self.store.prune_events(cutoff).await?;
        if pruned > 0 {
            tracing::info!(pruned, "old events pruned");
        }
        Ok(pruned)
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!("event applier started");
        let mut next_prune = tokio::time::Instant::now();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if tokio::time::Instant::now() >= next_prune {
                if let Err(err) = self.prune().await {
                    tracing::warn!(error = %err, "could not prune old events");
                }
                next_prune = tokio::time::Instant::now() + std::time::Duration::from_secs(600);
            }
            let started = tokio::time::Instant::now();
            let applied = match self.tick().await {
                Ok(applied) => applied,
                Err(err) => {
                    tracing::warn!(error = %err, "event applier cannot reach the database");
                    0
                }
            };
            // After work, a breather as long as the work (at most BUSY_PAUSE_MAX): ingestion,
            // which Stripe waits on, keeps at least half the time, and a customer's events
            // arriving in a burst meanwhile are applied as one snapshot.
            let pause = if applied == 0 {
                self.poll_interval
            } else {
                started.elapsed().min(BUSY_PAUSE_MAX)
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
        tracing::info!("event applier stopped");
    }

    /// Applies what is due for up to 64 customers; returns how many events it finished.
    /// Customers whose due events are all `customer.updated` are applied together, with a
    /// handful of statements for the whole batch; the others one by one, several at a time.
    pub async fn tick(&self) -> Result<usize, StoreError> {
        let due = self.store.due_event_customers(CUSTOMERS_PER_TICK).await?;
        if due.is_empty() {
            return Ok(0);
        }
        // Customers another instance is on are left to it.
        let leased = self
            .store
            .try_lease_customers(&due, &self.holder, self.lease)
            .await?;
        if leased.is_empty() {
            return Ok(0);
        }
        let applied = self.apply_leased(&leased).await;
        let released = self.store.release_customers(&leased, &self.holder).await;
        let applied = applied?;
        released?;
        Ok(applied)
    }

    async fn apply_leased(&self, customers: &[String]) -> Result<usize, StoreError> {
        let queues = self
            .store
            .customers_events(customers, EVENTS_PER_CUSTOMER)
            .await?;
        let (batched, mut singly): (Vec<_>, Vec<_>) = queues
            .into_iter()
            .partition(|(_, events)| batch::only_due_updates(events));
        let mut finished = 0;
        if !batched.is_empty() {
            let (applied, left) = batch::apply_update_batch(self.store.as_ref(), batched).await?;
            finished += applied;
            singly.extend(left);
        }
        let handlers = &Handlers {
            store: self.store.as_ref(),
            stripe: &self.stripe,
        };
        let mut runs = futures_util::stream::iter(singly)
            .map(|(customer, events)| async move {
                one_by_one::apply_customer(handlers, &self.retry, &customer, events).await
            })
            .buffer_unordered(self.concurrency);
        let mut first_error = None;
        while let Some(result) = runs.next().await {
            match result {
                Ok(n) => finished += n,
                Err(err) => first_error = first_error.or(Some(err)),
            }
        }
        match first_error {
            Some(err) if finished == 0 => Err(err),
            _ => Ok(finished),
        }
    }
}
