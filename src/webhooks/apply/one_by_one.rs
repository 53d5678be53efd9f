//! The one-by-one path: a customer's due events in order, each applied by its handler; a
//! failure is retried with the shared policy and holds back that customer's later events.

use super::{
    handlers::{Handlers, CUSTOMER_UPDATED},
    record_applied,
};
use crate::{
    retry::{Decision, JobFailure, RetryPolicy},
    store::{EventOutcome, EventToApply, StoreError},
};

/// Applies the customer's due events in order. A run of consecutive `customer.updated`
/// events is applied as its newest snapshot only: each snapshot is the whole customer, so
/// the older ones would be overwritten anyway. They still count for the same-second rule,
/// and they are marked applied together with the snapshot that superseded them.
pub(super) async fn apply_customer(
    handlers: &Handlers<'_>,
    retry: &RetryPolicy,
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
        let outcome = match handlers.apply(customer, event, newest_superseded).await {
            Ok(()) => EventOutcome::Applied,
            Err(failure) => outcome_of(retry, event, failure),
        };
        if matches!(outcome, EventOutcome::Applied) {
            superseded.push(event.event.id.clone());
            handlers.store.finish_events(&superseded, &outcome).await?;
            record_applied(event, superseded.len());
            finished += superseded.len();
            superseded.clear();
            newest_superseded = None;
        } else {
            // The superseded events stay pending: the next pass applies the newest of them
            // in order, then meets this one again (due for retry, or parked).
            handlers
                .store
                .finish_event(&event.event.id, &outcome)
                .await?;
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

fn outcome_of(retry: &RetryPolicy, event: &EventToApply, failure: JobFailure) -> EventOutcome {
    let attempts = u32::try_from(event.event.attempts + 1).unwrap_or(u32::MAX);
    match retry.decide(attempts, failure) {
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
