//! Delivering app events to `BILLSYNC_APP_WEBHOOK_URL`, signed as Standard Webhooks.
//!
//! At least once: an event is finished only after its delivery ended, so a process that dies
//! mid-delivery leaves it claimed until its lease runs out, and then it is sent again under
//! the same `webhook-id`. Per key (user) in commit order: the store hands out only each key's
//! first pending event, so the next one waits until this one is delivered or parked.
//! Different users are delivered in parallel, up to `concurrency` at once. A receiver that is
//! down, slow or failing only delays its own events: this task is all it holds up.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::{sync::watch, task::JoinSet};

use crate::{
    config::{AppEventsConfig, DeliveryConfig},
    domain::{AppEvent, AppEventOutcome},
    retry::RetryPolicy,
    store::{Store, StoreError},
};

/// The delivery's retry policy: exponential backoff with jitter, no attempt limit (the retry
/// window ends it).
fn policy(config: &DeliveryConfig) -> RetryPolicy {
    RetryPolicy {
        max_attempts: u32::MAX,
        backoff_base: config.backoff_base,
        backoff_max: config.backoff_max,
    }
}

/// Why an attempt did not deliver, in words fit for an operator's listing (no body, no data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptFailure(pub String);

/// Sends one event and says how it went.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    config: Arc<DeliveryConfig>,
}

impl Sender {
    pub fn new(config: Arc<DeliveryConfig>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("billsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client builds");
        Self { client, config }
    }

    /// One attempt: signed now, with the event's stable id.
    pub async fn send(&self, event: &AppEvent) -> Result<(), AttemptFailure> {
        let body = serde_json::to_vec(&event.body()).expect("an event body serializes");
        let timestamp = OffsetDateTime::now_utc().unix_timestamp();
        let signature = self.config.keys.sign(&event.id, timestamp, &body);
        let response = self
            .client
            .post(self.config.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|err| AttemptFailure(describe(&err)))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(AttemptFailure(format!(
                "the receiver answered {}",
                status.as_u16()
            )))
        }
    }

    /// What an attempt comes to: delivered, retried after a backoff, or parked once the next
    /// try would fall past the retry window.
    pub fn outcome(
        &self,
        event: &AppEvent,
        result: Result<(), AttemptFailure>,
        now: OffsetDateTime,
    ) -> AppEventOutcome {
        let Err(AttemptFailure(error)) = result else {
            return AppEventOutcome::Delivered;
        };
        let attempt = u32::try_from(event.attempts).unwrap_or(1).max(1);
        let delay = policy(&self.config).backoff(attempt, None);
        let at = now + delay;
        if at > event.created_at + self.config.retry_window {
            AppEventOutcome::Failed { error }
        } else {
            AppEventOutcome::Retry { at, error }
        }
    }
}

/// A transport error in a few words, without the URL (it may hold a token).
fn describe(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        "timed out".into()
    } else if err.is_connect() {
        "could not connect".into()
    } else if err.is_redirect() {
        "redirected".into()
    } else {
        "transport error".into()
    }
}

/// Puts committed events in order and, when a receiver is configured, delivers them; prunes
/// what is past retention.
pub struct Deliverer {
    store: Arc<dyn Store>,
    sender: Option<Sender>,
    lease: Duration,
    concurrency: usize,
    poll_interval: Duration,
    retention: Duration,
}

/// How often old events are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3_600);

impl Deliverer {
    /// Without a delivery configured the events are only sequenced, for the pull API.
    pub fn new(store: Arc<dyn Store>, config: &AppEventsConfig, retention: Duration) -> Self {
        let delivery = config.delivery.clone().map(Arc::new);
        Self {
            lease: delivery
                .as_ref()
                .map_or(Duration::from_secs(30), |c| c.lease()),
            concurrency: delivery.as_ref().map_or(1, |c| c.concurrency.max(1)),
            sender: delivery.map(Sender::new),
            store,
            poll_interval: config.poll_interval,
            retention,
        }
    }

    async fn prune(&self) {
        let cutoff = OffsetDateTime::now_utc() - self.retention;
        match self
            .store
            .prune_app_events(cutoff, self.sender.is_none())
            .await
        {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned app events past retention"),
            Err(err) => warn_unavailable(&err),
        }
    }

    /// Runs until `shutdown` turns true; deliveries in flight end first.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(
            delivers = self.sender.is_some(),
            "app event deliverer started"
        );
        let mut in_flight: JoinSet<(AppEvent, AppEventOutcome)> = JoinSet::new();
        let mut finished = Vec::new();
        let mut next_prune = tokio::time::Instant::now();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if tokio::time::Instant::now() >= next_prune {
                self.prune().await;
                next_prune += PRUNE_EVERY;
            }
            let mut worked = match self.store.sequence_app_events(SEQUENCE_BATCH).await {
                Ok(sequenced) => sequenced > 0,
                Err(err) => {
                    warn_unavailable(&err);
                    false
                }
            };
            if let Some(sender) = &self.sender {
                let free = self.concurrency.saturating_sub(in_flight.len());
                if free > 0 {
                    match self.store.claim_app_events(free as u32, self.lease).await {
                        Ok(claimed) => {
                            worked |= !claimed.is_empty();
                            for event in claimed {
                                let sender = sender.clone();
                                in_flight.spawn(async move {
                                    let result = sender.send(&event).await;
                                    let outcome =
                                        sender.outcome(&event, result, OffsetDateTime::now_utc());
                                    (event, outcome)
                                });
                            }
                        }
                        Err(err) => warn_unavailable(&err),
                    }
                }
            }
            while let Some(done) = in_flight.try_join_next() {
                finished.extend(done.ok());
            }
            if finished.is_empty() && !worked {
                tokio::select! {
                    Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                        finished.extend(done.ok());
                        // Deliveries end close together: a moment's wait gathers the others,
                        // so one write records them all (a write per event is what limits a
                        // SQLite file, one fsync each).
                        tokio::time::sleep(RECORD_LINGER).await;
                        while let Some(done) = in_flight.try_join_next() {
                            finished.extend(done.ok());
                        }
                    }
                    _ = tokio::time::sleep(self.poll_interval) => {}
                    _ = shutdown.changed() => {}
                }
            }
            // Whatever has finished is recorded in one write; the loop comes back at once
            // when it did something, so a backlog drains as fast as the receiver takes it.
            self.record(&mut finished).await;
        }
        while let Some(done) = in_flight.join_next().await {
            finished.extend(done.ok());
        }
        self.record(&mut finished).await;
        tracing::info!("app event deliverer stopped");
    }

    async fn record(&self, finished: &mut Vec<(AppEvent, AppEventOutcome)>) {
        if finished.is_empty() {
            return;
        }
        for (event, outcome) in finished.iter() {
            let label = match outcome {
                AppEventOutcome::Delivered => "delivered",
                AppEventOutcome::Retry { .. } => "retried",
                AppEventOutcome::Failed { .. } => "failed",
            };
            if let AppEventOutcome::Failed { error } = outcome {
                tracing::warn!(event_id = %event.id, kind = event.kind.as_str(), error,
                    "app event parked: its retry window closed");
            }
            metrics::counter!("billsync_app_events_total", "outcome" => label).increment(1);
        }
        // Not recorded (the database is away): the claims run out and the events are sent
        // again, which at-least-once allows.
        if let Err(err) = self.store.finish_app_events(finished).await {
            warn_unavailable(&err);
        }
        finished.clear();
    }
}

/// How long the deliverer waits, after one delivery ended, for others to end with it.
const RECORD_LINGER: Duration = Duration::from_millis(3);

/// Events given their place per round.
const SEQUENCE_BATCH: u32 = 2_000;

fn warn_unavailable(err: &StoreError) {
    tracing::warn!(error = %err, "app event deliverer cannot reach the database");
}
