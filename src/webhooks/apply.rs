//! The applier: applies stored events per customer, in order of Stripe's `created` (then
//! arrival), one worker per customer at a time across every instance (a lease row), with a
//! watermark so an older snapshot never overwrites a newer one. A same-second tie is settled
//! by re-fetching the customer from Stripe, so neither event's change is lost. A failing event
//! is retried with backoff and holds back only its own customer's later events.

use std::{collections::HashMap, sync::Arc};

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::watch;

use crate::{
    config::OutboxConfig,
    domain::{full_name, Email, LinkSource, PersonName, Phone, StripeCustomerId, UserId},
    retry::{Decision, JobFailure, RetryPolicy},
    store::{
        CustomerUpdate, EventOutcome, EventToApply, PushedProfile, RemoteProfile, Store,
        StoreError, SubscriptionItemMirror, SubscriptionMirror, UpdateContext, User, UserUpsert,
    },
    stripe::{Customer, StripeClient, Subscription},
};

const CUSTOMER_UPDATED: &str = "customer.updated";
/// Customers applied one by one at the same time at most (their database round trips
/// overlap).
pub const MAX_CONCURRENT_CUSTOMERS: usize = 8;
/// The longest breather between ticks that found work (see `run`).
const BUSY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(100);
/// Events of one customer applied per lease.
const EVENTS_PER_CUSTOMER: u32 = 500;
/// Customers looked at per tick.
const CUSTOMERS_PER_TICK: u32 = 64;

/// A customer and its waiting events, in apply order.
type CustomerQueue = (String, Vec<EventToApply>);

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
        let (batch, mut one_by_one): (Vec<_>, Vec<_>) = queues
            .into_iter()
            .partition(|(_, events)| only_due_updates(events));
        let mut finished = 0;
        if !batch.is_empty() {
            let (applied, left) = self.apply_update_batch(batch).await?;
            finished += applied;
            one_by_one.extend(left);
        }
        let mut runs = futures_util::stream::iter(one_by_one)
            .map(|(customer, events)| async move { self.apply_customer(&customer, events).await })
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

    /// Applies each customer's newest `customer.updated` snapshot (the older ones folded into
    /// it, as in `apply_customer`) in one read and one transaction for the whole batch.
    /// Returns how many events it finished, and the customers left to the one-by-one path:
    /// a same-second tie (Stripe is asked), a snapshot that does not parse, a user edited
    /// meanwhile, or a batch the database refused.
    #[tracing::instrument(skip_all, fields(customers = batch.len()))]
    async fn apply_update_batch(
        &self,
        batch: Vec<CustomerQueue>,
    ) -> Result<(usize, Vec<CustomerQueue>), StoreError> {
        let customers = batch.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>();
        let mut contexts = self
            .store
            .update_contexts(&customers)
            .await?
            .into_iter()
            .map(|c| (c.customer_id.clone(), c))
            .collect::<HashMap<_, _>>();
        let mut updates = Vec::with_capacity(batch.len());
        let mut pending = HashMap::with_capacity(batch.len());
        let mut left = Vec::new();
        for (customer, events) in batch {
            match plan_batched_update(contexts.remove(&customer), &events) {
                Some(update) => {
                    updates.push(update);
                    pending.insert(customer, events);
                }
                None => left.push((customer, events)),
            }
        }
        if updates.is_empty() {
            return Ok((0, left));
        }
        let conflicts = match self.store.commit_customer_updates(&updates).await {
            Ok(conflicts) => conflicts,
            Err(err) => {
                tracing::warn!(error = %err, "batch of customer updates not written; one by one instead");
                updates.iter().map(|u| u.customer_id.clone()).collect()
            }
        };
        let mut finished = 0;
        for update in &updates {
            let events = pending.remove(&update.customer_id).unwrap_or_default();
            if conflicts.contains(&update.customer_id) {
                left.push((update.customer_id.clone(), events));
                continue;
            }
            if let Some(profile) = &update.profile {
                tracing::info!(user_id = %profile.user.id, "profile updated from Stripe");
            }
            if let Some(newest) = events.last() {
                record_applied(newest, events.len());
            }
            finished += events.len();
        }
        Ok((finished, left))
    }

    /// Applies the customer's due events in order. A run of consecutive `customer.updated`
    /// events is applied as its newest snapshot only: each snapshot is the whole customer, so
    /// the older ones would be overwritten anyway. They still count for the same-second rule,
    /// and they are marked applied together with the snapshot that superseded them.
    async fn apply_customer(
        &self,
        customer: &str,
        events: Vec<EventToApply>,
    ) -> Result<usize, StoreError> {
        let now = time::OffsetDateTime::now_utc();
        // An earlier event waiting for its retry holds the later ones back.
        let mut due = events
            .iter()
            .take_while(|e| e.next_attempt_at.is_none_or(|at| at <= now))
            .collect::<Vec<_>>();
        // The database found the next event due but this clock does not (skewed clocks):
        // the snapshot superseded by it was not loaded; the next pass applies it.
        while due.last().is_some_and(|e| e.payload.is_none()) {
            due.pop();
        }
        let mut finished = 0;
        let mut superseded: Vec<String> = Vec::new();
        let mut newest_superseded: Option<(i64, &str)> = None;
        for (index, event) in due.iter().enumerate() {
            let is_update = event.event.kind == CUSTOMER_UPDATED;
            if is_update
                && due
                    .get(index + 1)
                    .is_some_and(|next| next.event.kind == CUSTOMER_UPDATED)
            {
                superseded.push(event.event.id.clone());
                newest_superseded = Some((event.event.created, &event.event.id));
                continue;
            }
            let outcome = match self.apply(customer, event, newest_superseded).await {
                Ok(()) => EventOutcome::Applied,
                Err(failure) => self.outcome_of(event, failure),
            };
            if matches!(outcome, EventOutcome::Applied) {
                superseded.push(event.event.id.clone());
                self.store.finish_events(&superseded, &outcome).await?;
                record_applied(event, superseded.len());
                finished += superseded.len();
                superseded.clear();
                newest_superseded = None;
            } else {
                // The superseded events stay pending: the next pass applies the newest of them
                // in order, then meets this one again (due for retry, or parked).
                self.store.finish_event(&event.event.id, &outcome).await?;
                let last_attempt = matches!(outcome, EventOutcome::Failed { .. });
                metrics::counter!("billsync_webhook_event_failures_total",
                    "final" => if last_attempt { "true" } else { "false" })
                .increment(1);
                finished += 1;
                break;
            }
        }
        Ok(finished)
    }

    fn outcome_of(&self, event: &EventToApply, failure: JobFailure) -> EventOutcome {
        let attempts = u32::try_from(event.event.attempts + 1).unwrap_or(u32::MAX);
        match self.retry.decide(attempts, failure) {
            Decision::Retry { delay, error } => {
                tracing::info!(event_id = %event.event.id, %error, "event will be retried");
                EventOutcome::Retry { delay, error }
            }
            Decision::Exhausted { error } | Decision::Permanent { error } => {
                tracing::warn!(event_id = %event.event.id, %error, "event failed; replay it once fixed");
                EventOutcome::Failed { error }
            }
        }
    }

    /// `superseded` is the newest `customer.updated` folded into this one (see
    /// `apply_customer`).
    #[tracing::instrument(skip_all, fields(event_id = %event.event.id, kind = %event.event.kind))]
    async fn apply(
        &self,
        customer: &str,
        event: &EventToApply,
        superseded: Option<(i64, &str)>,
    ) -> Result<(), JobFailure> {
        let object = event_object(event)?;
        let created = event.event.created;
        match event.event.kind.as_str() {
            "customer.created" => self.customer_created(parse(object)?).await,
            CUSTOMER_UPDATED => {
                self.customer_updated(
                    customer,
                    parse(object)?,
                    created,
                    &event.event.id,
                    superseded,
                )
                .await
            }
            "customer.deleted" => {
                self.customer_deleted(parse(object)?, created, &event.event.id)
                    .await
            }
            "customer.subscription.created"
            | "customer.subscription.updated"
            | "customer.subscription.deleted" => {
                self.subscription_changed(parse(object)?, created, &event.event.id)
                    .await
            }
            _ => Ok(()),
        }
    }

    /// Links the customer to the user its metadata names, if that user exists and is unlinked.
    /// A customer deleted in Stripe is never linked (`insert_link` refuses it), so a late
    /// `customer.created` cannot bring one back.
    async fn customer_created(&self, customer: Customer) -> Result<(), JobFailure> {
        let Some(user) = customer
            .user_id_metadata()
            .and_then(|u| UserId::parse(u).ok())
        else {
            return Ok(());
        };
        let Ok(customer_id) = StripeCustomerId::parse(&customer.id) else {
            return Ok(());
        };
        if self.store.get_user(&user).await?.is_none()
            || self.store.get_link(&user).await?.is_some()
        {
            return Ok(());
        }
        let outcome = self
            .store
            .insert_link(
                &user,
                &customer_id,
                customer.livemode,
                LinkSource::StripeMetadata,
            )
            .await?;
        tracing::info!(?outcome, "customer.created linked");
        Ok(())
    }

    /// Applies a Stripe-side profile change (the billing portal, the dashboard) to the user,
    /// unless it is billsync's own push coming back (echo) or a local edit is on its way out.
    async fn customer_updated(
        &self,
        customer: &str,
        event_snapshot: Customer,
        created: i64,
        event_id: &str,
        superseded: Option<(i64, &str)>,
    ) -> Result<(), JobFailure> {
        if event_snapshot.id != customer {
            return Ok(()); // filed under another customer: nothing of ours to change
        }
        let Some(context) = self
            .store
            .update_contexts(&[customer.to_owned()])
            .await?
            .pop()
        else {
            return Ok(()); // not one of ours
        };
        let mut verdict = match order(context.watermark.clone(), superseded, created, event_id) {
            Order::AlreadyApplied | Order::Older => return Ok(()),
            // Same second as the newest applied: which came first is unknowable from the
            // events, so ask Stripe for the current state.
            Order::SameSecond => match self.current_customer(customer).await? {
                Some(current) => profile_write(&context, &current, true),
                None => return Ok(()),
            },
            Order::Newer => profile_write(&context, &event_snapshot, false),
        };
        if verdict == Verdict::AskStripe {
            verdict = match self.current_customer(customer).await? {
                Some(current) => profile_write(&context, &current, true),
                None => return Ok(()),
            };
        }
        if let Verdict::Write(profile) = verdict {
            if self
                .store
                .apply_remote_profile(&profile.user, profile.expected, &profile.pushed)
                .await?
                .is_none()
            {
                // A local edit landed meanwhile: try again, and it will win.
                return Err(JobFailure::Transient {
                    error: "the user changed while applying".into(),
                    retry_after: None,
                });
            }
            tracing::info!(user_id = %context.user.id, "profile updated from Stripe");
        }
        self.store
            .raise_link_watermark(customer, created, event_id)
            .await?;
        Ok(())
    }

    /// The customer as Stripe has it now; `None` once it is deleted.
    async fn current_customer(&self, customer: &str) -> Result<Option<Customer>, JobFailure> {
        match self.stripe.retrieve_customer(customer).await {
            Ok(current) if !current.deleted => Ok(Some(current)),
            Ok(_) => Ok(None),
            Err(err) if err.is_not_found() => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Remembers the customer as deleted, unlinks the user (who keeps their account) and
    /// marks their subscriptions canceled.
    async fn customer_deleted(
        &self,
        customer: Customer,
        created: i64,
        event_id: &str,
    ) -> Result<(), JobFailure> {
        let Ok(customer_id) = StripeCustomerId::parse(&customer.id) else {
            return Ok(());
        };
        // First, so that nothing can link it between the unlink and this.
        self.store
            .record_deleted_customer(customer_id.as_str(), created)
            .await?;
        if let Some(link) = self.store.get_link_by_customer(&customer_id).await? {
            self.store.remove_link(&link.user_id).await?;
            tracing::info!(user_id = %link.user_id, "customer deleted in Stripe: unlinked");
        }
        self.store
            .cancel_customer_subscriptions(customer_id.as_str(), created, event_id)
            .await?;
        Ok(())
    }

    /// Mirrors the subscription, unless a newer event was applied to it; a same-second tie
    /// is settled as customers' are: Stripe is asked for the current state.
    async fn subscription_changed(
        &self,
        event_snapshot: Subscription,
        created: i64,
        event_id: &str,
    ) -> Result<(), JobFailure> {
        let stored = self
            .store
            .subscription_watermark(&event_snapshot.id)
            .await?;
        let sub = match order(stored, None, created, event_id) {
            Order::AlreadyApplied | Order::Older => return Ok(()),
            Order::SameSecond => {
                match self.stripe.retrieve_subscription(&event_snapshot.id).await {
                    Ok(current) => current,
                    Err(err) if err.is_not_found() => return Ok(()),
                    Err(err) => return Err(err.into()),
                }
            }
            Order::Newer => event_snapshot,
        };
        let user = match StripeCustomerId::parse(&sub.customer) {
            Ok(customer) => self
                .store
                .get_link_by_customer(&customer)
                .await?
                .map(|l| l.user_id),
            Err(_) => None,
        };
        let mirror = SubscriptionMirror {
            user_id: user,
            customer_id: sub.customer.clone(),
            status: sub.status.clone(),
            price_id: sub.price_id().map(str::to_owned),
            cancel_at_period_end: sub.cancel_at_period_end,
            current_period_end: sub
                .current_period_end()
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok()),
            updated_at: crate::store::now(),
            cancel_at: unix(sub.cancel_at),
            canceled_at: unix(sub.canceled_at),
            ended_at: unix(sub.ended_at),
            items: sub
                .all_items()
                .iter()
                .map(|item| SubscriptionItemMirror {
                    id: item.id.clone(),
                    price_id: item.price_id().map(str::to_owned),
                    quantity: item.quantity,
                    current_period_end: item.current_period_end,
                })
                .collect(),
            id: sub.id,
        };
        self.store
            .upsert_subscription_if_newer(&mirror, created, event_id)
            .await?;
        Ok(())
    }
}

/// Whether all of a customer's waiting events are fresh `customer.updated` snapshots (the
/// batched path), the newest one loaded.
fn only_due_updates(events: &[EventToApply]) -> bool {
    events.iter().all(|e| {
        e.event.kind == CUSTOMER_UPDATED && e.event.attempts == 0 && e.next_attempt_at.is_none()
    }) && events.last().is_some_and(|e| e.payload.is_some())
}

fn record_applied(newest: &EventToApply, events: usize) {
    metrics::counter!("billsync_webhook_events_applied_total").increment(events as u64);
    metrics::histogram!("billsync_webhook_apply_lag_seconds").record(
        (time::OffsetDateTime::now_utc() - newest.event.received_at)
            .as_seconds_f64()
            .max(0.0),
    );
}

/// The batched path's plan for a customer's run of `customer.updated` events; `None` leaves
/// the customer to the one-by-one path (a same-second tie, a snapshot that does not parse, a
/// snapshot whose provenance only Stripe can settle).
fn plan_batched_update(
    context: Option<UpdateContext>,
    events: &[EventToApply],
) -> Option<CustomerUpdate> {
    let newest = events.last()?;
    let events_done = || {
        events
            .iter()
            .map(|e| e.event.id.clone())
            .collect::<Vec<_>>()
    };
    let customer_id = newest.event.customer_id.clone()?;
    // Parsed first, as the one-by-one path does: a snapshot that does not parse is left to
    // it (and parked as failed there), linked customer or not.
    let snapshot: Customer = event_object(newest).and_then(parse).ok()?;
    if snapshot.id != customer_id {
        return None;
    }
    let Some(context) = context else {
        // Not one of ours: nothing to write, the events are done.
        return Some(CustomerUpdate {
            customer_id,
            profile: None,
            watermark: None,
            events: events_done(),
        });
    };
    let superseded = events
        .len()
        .checked_sub(2)
        .map(|i| (events[i].event.created, events[i].event.id.as_str()));
    let (created, event_id) = (newest.event.created, newest.event.id.as_str());
    let (profile, watermark) = match order(context.watermark.clone(), superseded, created, event_id)
    {
        Order::AlreadyApplied | Order::Older => (None, None),
        Order::SameSecond => return None,
        Order::Newer => match profile_write(&context, &snapshot, false) {
            Verdict::Nothing => (None, Some((created, event_id.to_owned()))),
            Verdict::Write(profile) => (Some(*profile), Some((created, event_id.to_owned()))),
            // Stripe is asked on the one-by-one path.
            Verdict::AskStripe => return None,
        },
    };
    Some(CustomerUpdate {
        customer_id,
        profile,
        watermark,
        events: events_done(),
    })
}

/// Where a snapshot stands against the newest one applied to its customer.
#[derive(Debug, PartialEq, Eq)]
enum Order {
    /// This very event was applied before (a crash came between applying it and marking it
    /// applied).
    AlreadyApplied,
    Older,
    /// Same second as the newest applied: which came first is unknowable from the events.
    SameSecond,
    Newer,
}

/// `stored` is the link's watermark; `superseded` the newest older snapshot folded into this
/// one (see `apply_customer`), which counts as applied just before it: on the same second it
/// is the one to compare with, as if it had been applied on its own.
fn order(
    stored: Option<(i64, Option<String>)>,
    superseded: Option<(i64, &str)>,
    created: i64,
    event_id: &str,
) -> Order {
    let watermark = match (stored, superseded) {
        (Some((seen, id)), Some((folded, _))) if seen > folded => Some((seen, id)),
        (_, Some((folded, id))) => Some((folded, Some(id.to_owned()))),
        (stored, None) => stored,
    };
    match watermark {
        Some((seen, Some(id))) if created == seen && id == event_id => Order::AlreadyApplied,
        Some((seen, _)) if created < seen => Order::Older,
        Some((seen, _)) if created == seen => Order::SameSecond,
        _ => Order::Newer,
    }
}

/// What a newer snapshot calls for.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Nothing to write: a local edit is on its way out, the snapshot says nothing new, or it
    /// is billsync's own push coming back.
    Nothing,
    Write(Box<RemoteProfile>),
    /// Whose values these are is unknowable from the snapshot: ask Stripe for its current
    /// state and judge that.
    AskStripe,
}

/// Whose values a snapshot carries, told by the profile version each push stamps into the
/// customer's metadata (`billsync_profile_version`).
#[derive(Debug, PartialEq, Eq)]
enum Provenance {
    /// Stamped by the newest recorded push: that push's values, or a Stripe-side change made
    /// since (compared with what was pushed).
    SinceNewestPush,
    /// Stamped by an earlier push (or by one not recorded yet): the state before billsync's
    /// newest push, which sent every field again. Applying it would revert a newer edit.
    BeforeNewestPush,
    /// Unstamped while billsync's pushes stamp (a snapshot from before the first stamped
    /// push, metadata edited by hand), or stamped while no stamped push is recorded (a
    /// re-made link).
    Unknown,
    /// Neither carries a stamp (pushes from before stamps): compared with the last push.
    Unstamped,
}

fn provenance(pushed_stamp: Option<i64>, snapshot_stamp: Option<i64>) -> Provenance {
    match (snapshot_stamp, pushed_stamp) {
        (Some(seen), Some(newest)) if seen == newest => Provenance::SinceNewestPush,
        (Some(_), Some(_)) => Provenance::BeforeNewestPush,
        (Some(_), None) | (None, Some(_)) => Provenance::Unknown,
        (None, None) => Provenance::Unstamped,
    }
}

/// The profile write a newer snapshot calls for. Local values win while a push is pending
/// or in flight; a snapshot stamped by an earlier push is never applied, however late it
/// comes; a snapshot equal to what was last pushed is an echo. `from_stripe` says the
/// snapshot is Stripe's current state, fetched: no one left to ask, so one of unknown
/// provenance is compared with the last push.
fn profile_write(context: &UpdateContext, snapshot: &Customer, from_stripe: bool) -> Verdict {
    if context.active_push {
        tracing::debug!("local edit on its way to Stripe: local values win");
        return Verdict::Nothing;
    }
    match provenance(context.pushed_stamp, snapshot.profile_stamp()) {
        Provenance::BeforeNewestPush => {
            tracing::debug!("an earlier push's state: billsync's newest push overwrote it");
            return Verdict::Nothing;
        }
        Provenance::Unknown if !from_stripe => return Verdict::AskStripe,
        Provenance::Unknown | Provenance::SinceNewestPush | Provenance::Unstamped => {}
    }
    let Some((desired, remote)) = remote_change(&context.user, snapshot) else {
        return Verdict::Nothing;
    };
    if context
        .last_push
        .as_ref()
        .is_some_and(|last| same_profile(last, &remote))
    {
        tracing::debug!("billsync's own push came back: nothing to write");
        return Verdict::Nothing;
    }
    Verdict::Write(Box::new(RemoteProfile {
        user: desired,
        expected: context.user.version,
        pushed: remote,
    }))
}

fn unix(seconds: Option<i64>) -> Option<time::OffsetDateTime> {
    seconds.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
}

/// The event's `data.object`, from its stored payload.
fn event_object(event: &EventToApply) -> Result<Value, JobFailure> {
    let payload = event
        .payload
        .as_deref()
        .ok_or_else(|| JobFailure::Permanent("stored payload not loaded".into()))?;
    let mut payload: Value = serde_json::from_str(payload)
        .map_err(|e| JobFailure::Permanent(format!("stored payload: {e}")))?;
    Ok(payload
        .pointer_mut("/data/object")
        .map(Value::take)
        .unwrap_or(Value::Null))
}

fn parse<T: serde::de::DeserializeOwned>(object: Value) -> Result<T, JobFailure> {
    serde_json::from_value(object).map_err(|e| JobFailure::Permanent(format!("event object: {e}")))
}

fn blank_to_none(value: Option<&str>) -> Option<String> {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

fn same_profile(a: &PushedProfile, b: &PushedProfile) -> bool {
    a.email.eq_ignore_ascii_case(&b.email)
        && blank_to_none(a.name.as_deref()) == blank_to_none(b.name.as_deref())
        && blank_to_none(a.phone.as_deref()) == blank_to_none(b.phone.as_deref())
}

/// The user as the Stripe snapshot would have it, and the snapshot's values; `None` when the
/// snapshot says nothing new.
fn remote_change(user: &User, customer: &Customer) -> Option<(UserUpsert, PushedProfile)> {
    let remote = PushedProfile {
        email: customer
            .email
            .as_deref()
            .map(str::trim)
            .unwrap_or_default()
            .to_lowercase(),
        name: blank_to_none(customer.name.as_deref()),
        phone: blank_to_none(customer.phone.as_deref()),
        version: user.version,
    };
    let email = Email::parse(&remote.email).unwrap_or_else(|_| user.email.clone());
    let local_name = full_name(user.first_name.as_ref(), user.last_name.as_ref());
    // Split Stripe's one name only when it differs from ours, so "Mary Ann" + "Smith" stays.
    let (first_name, last_name) = if remote.name == local_name {
        (user.first_name.clone(), user.last_name.clone())
    } else {
        let name = remote.name.clone().unwrap_or_default();
        let (first, last) = name.split_once(' ').unwrap_or((name.as_str(), ""));
        (
            PersonName::parse_optional(Some(first), "first_name").unwrap_or(None),
            PersonName::parse_optional(Some(last), "last_name").unwrap_or(None),
        )
    };
    let phone = match &remote.phone {
        None => None,
        Some(raw) => Phone::parse(raw).ok().or_else(|| user.phone.clone()),
    };
    let desired = UserUpsert {
        id: user.id.clone(),
        email_verified: user.email_verified && email == user.email,
        email,
        first_name,
        last_name,
        phone,
    };
    let unchanged = desired.email == user.email
        && desired.first_name == user.first_name
        && desired.last_name == user.last_name
        && desired.phone == user.phone;
    (!unchanged).then_some((desired, remote))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provenance_follows_the_stamps() {
        use Provenance::*;
        let cases = [
            // (newest recorded push's stamp, the snapshot's stamp, provenance)
            (Some(3), Some(3), SinceNewestPush),
            (Some(3), Some(2), BeforeNewestPush),
            (Some(3), Some(4), BeforeNewestPush),
            (Some(3), None, Unknown),
            (None, Some(3), Unknown),
            (None, None, Unstamped),
        ];
        for (pushed, seen, expected) in cases {
            assert_eq!(provenance(pushed, seen), expected, "{pushed:?} {seen:?}");
        }
    }

    fn context(version: i64, pushed_stamp: Option<i64>, active_push: bool) -> UpdateContext {
        let now = time::OffsetDateTime::now_utc();
        UpdateContext {
            customer_id: "cus_1".into(),
            user: User {
                id: UserId::parse("u1").unwrap(),
                email: Email::parse("ada@example.com").unwrap(),
                email_verified: true,
                first_name: PersonName::parse_optional(Some("Ada"), "first_name").unwrap(),
                last_name: PersonName::parse_optional(Some("Hopper"), "last_name").unwrap(),
                phone: None,
                version,
                created_at: now,
                updated_at: now,
            },
            watermark: None,
            active_push,
            last_push: Some(PushedProfile {
                email: "ada@example.com".into(),
                name: Some("Ada Hopper".into()),
                phone: None,
                version,
            }),
            pushed_stamp,
        }
    }

    fn snapshot(name: &str, stamp: Option<i64>) -> Customer {
        let metadata = stamp.map_or(
            serde_json::json!({}),
            |s| serde_json::json!({"billsync_profile_version": s.to_string()}),
        );
        serde_json::from_value(serde_json::json!({
            "id": "cus_1", "email": "ada@example.com", "name": name, "metadata": metadata,
        }))
        .unwrap()
    }

    #[test]
    fn profile_write_rules() {
        let write = |v: &Verdict| matches!(v, Verdict::Write(_));
        // (what the link knows, the snapshot, from Stripe's current state, writes?)
        let cases = [
            // Echo of the newest push.
            (
                context(5, Some(5), false),
                snapshot("Ada Hopper", Some(5)),
                false,
                false,
            ),
            // A portal change after the newest push.
            (
                context(5, Some(5), false),
                snapshot("Grace Hopper", Some(5)),
                false,
                true,
            ),
            // An earlier push's state, however different: never.
            (
                context(5, Some(5), false),
                snapshot("Ada Lovelace", Some(4)),
                false,
                false,
            ),
            // A pending local edit wins over anything.
            (
                context(5, Some(5), true),
                snapshot("Grace Hopper", Some(5)),
                false,
                false,
            ),
            // Before stamps: the last push decides.
            (
                context(5, None, false),
                snapshot("Ada Hopper", None),
                false,
                false,
            ),
            (
                context(5, None, false),
                snapshot("Grace Hopper", None),
                false,
                true,
            ),
            // Stripe's own current state of unknown provenance: compared with the last push.
            (
                context(5, Some(5), false),
                snapshot("Grace Hopper", None),
                true,
                true,
            ),
            (
                context(5, Some(5), false),
                snapshot("Ada Hopper", None),
                true,
                false,
            ),
        ];
        for (index, (context, snapshot, from_stripe, writes)) in cases.into_iter().enumerate() {
            let verdict = profile_write(&context, &snapshot, from_stripe);
            assert_eq!(write(&verdict), writes, "case {index}: {verdict:?}");
        }
        // Unknown provenance in an event: Stripe is asked.
        assert_eq!(
            profile_write(
                &context(5, Some(5), false),
                &snapshot("Grace Hopper", None),
                false
            ),
            Verdict::AskStripe
        );
    }
}
