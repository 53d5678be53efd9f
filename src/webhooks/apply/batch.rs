//! The batched path: customers whose waiting events are all fresh `customer.updated`
//! snapshots are applied together, each as its newest snapshot, with one read and one
//! transaction for the whole batch. Whatever needs more (Stripe asked, a retry, a conflict)
//! is left to the one-by-one path.

use std::collections::HashMap;

use super::{
    handlers::{event_object, parse, CUSTOMER_UPDATED},
    record_applied,
    rules::{order, profile_write, Order, Verdict},
    CustomerQueue,
};
use crate::{
    store::{CustomerUpdate, EventToApply, Store, StoreError, UpdateContext},
    stripe::Customer,
};

/// Whether all of a customer's waiting events are fresh `customer.updated` snapshots (the
/// batched path), the newest one loaded.
pub(super) fn only_due_updates(events: &[EventToApply]) -> bool {
    events.iter().all(|e| {
        e.event.kind == CUSTOMER_UPDATED && e.event.attempts == 0 && e.next_attempt_at.is_none()
    }) && events.last().is_some_and(|e| e.payload.is_some())
}

/// Applies each customer's newest `customer.updated` snapshot (the older ones folded into
/// it, as `one_by_one::apply_customer` does) in one read and one transaction for the whole batch.
/// Returns how many events it finished, and the customers left to the one-by-one path:
/// a same-second tie (Stripe is asked), a snapshot that does not parse, a user edited
/// meanwhile, or a batch the database refused.
#[tracing::instrument(skip_all, fields(customers = batch.len()))]
pub(super) async fn apply_update_batch(
    store: &dyn Store,
    batch: Vec<CustomerQueue>,
) -> Result<(usize, Vec<CustomerQueue>), StoreError> {
    let customers = batch.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>();
    let mut contexts = store
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
    let conflicts = match store.commit_customer_updates(&updates).await {
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
