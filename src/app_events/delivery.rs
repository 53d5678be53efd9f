//! Delivering app events to `BILLSYNC_APP_WEBHOOK_URL`, signed as Standard Webhooks.
//!
//! At least once: an event is finished only after its delivery ended, so a process that dies
//! mid-delivery leaves it claimed until its lease runs out, and then it is sent again under
//! the same `webhook-id`. Per key (user) in commit order: the store hands out each key's first
//! pending events as one run, which one task sends one after another, each only once the one
//! before was delivered or parked; the key's next run is claimed after this one is recorded.
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

    /// Sends one key's claimed events in position order, each once the one before got
    /// through (delivered or parked). After one that will be retried, and once too little of
    /// the lease (`leased_until`) is left for a send to time out within it, the rest are
    /// handed back unsent: no other instance can have them while this one might still send.
    pub async fn send_in_order(
        &self,
        events: Vec<AppEvent>,
        leased_until: tokio::time::Instant,
    ) -> Vec<(AppEvent, AppEventOutcome)> {
        let mut outcomes = Vec::with_capacity(events.len());
        let mut going = true;
        for (index, event) in events.into_iter().enumerate() {
            let ends_by = tokio::time::Instant::now() + self.config.timeout + LEASE_MARGIN;
            if !going || (index > 0 && ends_by > leased_until) {
                going = false;
                outcomes.push((event, AppEventOutcome::Released));
                continue;
            }
            let result = self.send(&event).await;
            let outcome = self.outcome(&event, result, OffsetDateTime::now_utc());
            going = !matches!(outcome, AppEventOutcome::Retry { .. });
            outcomes.push((event, outcome));
        }
        outcomes
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
        let mut in_flight: JoinSet<Vec<(AppEvent, AppEventOutcome)>> = JoinSet::new();
        let mut finished = Vec::new();
        let mut next_prune = tokio::time::Instant::now();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let round_started = tokio::time::Instant::now();
            if round_started >= next_prune {
                self.prune().await;
                next_prune += PRUNE_EVERY;
            }
            let sequenced = match self.store.sequence_app_events(SEQUENCE_BATCH).await {
                Ok(sequenced) => sequenced,
                Err(err) => {
                    warn_unavailable(&err);
                    0
                }
            };
            let mut worked = sequenced > 0;
            // More is due than this round took: the next round starts at once.
            let mut saturated = sequenced >= u64::from(SEQUENCE_BATCH);
            if let Some(sender) = &self.sender {
                let free = self.concurrency.saturating_sub(in_flight.len());
                if free > 0 {
                    let leased_until = tokio::time::Instant::now() + self.lease;
                    let claimed = self
                        .store
                        .claim_app_events(free as u32, PER_KEY, self.lease)
                        .await;
                    match claimed {
                        Ok(claimed) => {
                            worked |= !claimed.is_empty();
                            let runs = by_key(claimed);
                            saturated |= runs.len() >= free;
                            for events in runs {
                                let sender = sender.clone();
                                in_flight.spawn(async move {
                                    sender.send_in_order(events, leased_until).await
                                });
                            }
                        }
                        Err(err) => warn_unavailable(&err),
                    }
                }
            }
            while let Some(done) = in_flight.try_join_next() {
                finished.extend(done.into_iter().flatten());
            }
            if !saturated {
                // Everything due was taken. A round that found work (or has finished
                // deliveries to record) leaves `ROUND_GAP` before the next, gathering the
                // deliveries that end meanwhile: the statements are per round, so under a
                // steady trickle of events each round claims and records many, not one each.
                // An idle round waits for a delivery to end, or for the poll interval.
                let busy = worked || !finished.is_empty();
                let (until, gather) = if busy {
                    (round_started + ROUND_GAP, Gather::UntilDeadline)
                } else {
                    (round_started + self.poll_interval, Gather::FirstAndItsPeers)
                };
                wait_for_deliveries(&mut in_flight, &mut finished, until, gather, &mut shutdown)
                    .await;
            }
            // Whatever has finished is recorded in one write.
            self.record(&mut finished).await;
        }
        while let Some(done) = in_flight.join_next().await {
            finished.extend(done.into_iter().flatten());
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
                AppEventOutcome::Released => continue,
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

/// What a wait between rounds gathers.
#[derive(Clone, Copy, PartialEq)]
enum Gather {
    /// Every delivery that ends before the deadline.
    UntilDeadline,
    /// The first delivery to end and those ending within `RECORD_LINGER` of it.
    FirstAndItsPeers,
}

/// Moves the deliveries that end into `finished`, as `gather` says, until `until` or shutdown.
async fn wait_for_deliveries(
    in_flight: &mut JoinSet<Vec<(AppEvent, AppEventOutcome)>>,
    finished: &mut Vec<(AppEvent, AppEventOutcome)>,
    until: tokio::time::Instant,
    gather: Gather,
    shutdown: &mut watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                finished.extend(done.into_iter().flatten());
                if gather == Gather::FirstAndItsPeers {
                    // Deliveries end close together: a moment's wait gathers the others, so
                    // one write records them all (a write per event is what limits a SQLite
                    // file, one fsync each).
                    tokio::time::sleep(RECORD_LINGER).await;
                    while let Some(done) = in_flight.try_join_next() {
                        finished.extend(done.into_iter().flatten());
                    }
                    return;
                }
            }
            _ = tokio::time::sleep_until(until) => return,
            _ = shutdown.changed() => return,
        }
    }
}

/// Events of one key claimed together: a backlog of one user's events (after an outage, or a
/// burst of changes) costs one claim and one record per this many, not per event.
const PER_KEY: u32 = 32;

/// A send starts only if its timeout falls this long before the lease runs out.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// Claimed events grouped by key, each group in position order (as claimed).
fn by_key(claimed: Vec<AppEvent>) -> Vec<Vec<AppEvent>> {
    let mut groups: Vec<Vec<AppEvent>> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for event in claimed {
        let at = *index.entry(event.key.clone()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[at].push(event);
    }
    groups
}

/// How long the deliverer waits, after one delivery ended, for others to end with it.
const RECORD_LINGER: Duration = Duration::from_millis(3);

/// The least time from one round's start to the next while the deliverer keeps up (adds at
/// most this to an event's delivery): a round costs a few statements however many events it
/// moves, and without a gap a trickle of events would cost them per event, on the cores
/// that ingestion needs.
const ROUND_GAP: Duration = Duration::from_millis(10);

/// Events given their place per round.
const SEQUENCE_BATCH: u32 = 2_000;

fn warn_unavailable(err: &StoreError) {
    tracing::warn!(error = %err, "app event deliverer cannot reach the database");
}
