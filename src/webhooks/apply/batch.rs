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

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::{
        store::{EventState, StoredEvent},
        webhooks::apply::rules::tests::{context, snapshot_json},
    };

    /// A fresh `customer.updated` for `cus_1`; `object: None` is a superseded one, not loaded.
    fn update(id: &str, created: i64, object: Option<Value>) -> EventToApply {
        EventToApply {
            event: StoredEvent {
                id: id.into(),
                kind: CUSTOMER_UPDATED.into(),
                created,
                livemode: false,
                customer_id: Some("cus_1".into()),
                state: EventState::Pending,
                attempts: 0,
                last_error: None,
                received_at: time::OffsetDateTime::now_utc(),
            },
            payload: object.map(|object| json!({"data": {"object": object}}).to_string()),
            next_attempt_at: None,
        }
    }

    #[test]
    fn only_fresh_updates_with_the_newest_loaded_take_the_batched_path() {
        let fresh = || update("evt_1", 10, Some(snapshot_json("Ada Hopper", Some(5))));
        let retried = EventToApply {
            event: StoredEvent {
                attempts: 1,
                ..fresh().event
            },
            ..fresh()
        };
        let waiting = EventToApply {
            next_attempt_at: Some(time::OffsetDateTime::now_utc()),
            ..fresh()
        };
        let deleted = EventToApply {
            event: StoredEvent {
                kind: "customer.deleted".into(),
                ..fresh().event
            },
            ..fresh()
        };
        let superseded = update("evt_0", 9, None);
        // (the customer's waiting events, batched?)
        let cases = [
            (vec![fresh()], true),
            (vec![superseded.clone(), fresh()], true),
            (vec![fresh(), superseded], false),
            (vec![retried], false),
            (vec![waiting], false),
            (vec![fresh(), deleted], false),
            (vec![], false),
        ];
        for (index, (events, batched)) in cases.into_iter().enumerate() {
            assert_eq!(only_due_updates(&events), batched, "case {index}");
        }
    }

    #[test]
    fn plan_batched_update_writes_what_the_rules_allow_and_leaves_the_rest() {
        let grace = || Some(snapshot_json("Grace Hopper", Some(5)));
        let linked = |watermark: Option<(i64, &str)>| {
            let mut context = context(5, Some(5), false);
            context.watermark = watermark.map(|(at, id)| (at, Some(id.to_owned())));
            Some(context)
        };
        let mut elsewhere = snapshot_json("Grace Hopper", Some(5));
        elsewhere["id"] = json!("cus_2");
        // (the link, the events, `None` when left to the one-by-one path, else whether the
        // profile is written and the watermark raised to)
        let cases = [
            // Not one of ours: nothing to write, the events are done.
            (
                None,
                vec![update("evt_1", 11, grace())],
                Some((false, None)),
            ),
            // A snapshot that does not parse, or filed under another customer.
            (None, vec![update("evt_1", 11, Some(json!("?")))], None),
            (
                linked(None),
                vec![update("evt_1", 11, Some(elsewhere))],
                None,
            ),
            // Newer: a Stripe-side change is written; an echo only raises the watermark.
            (
                linked(Some((10, "evt_0"))),
                vec![update("evt_1", 11, grace())],
                Some((true, Some((11, "evt_1")))),
            ),
            (
                linked(Some((10, "evt_0"))),
                vec![update(
                    "evt_1",
                    11,
                    Some(snapshot_json("Ada Hopper", Some(5))),
                )],
                Some((false, Some((11, "evt_1")))),
            ),
            // Older, or this very one again: done, nothing written.
            (
                linked(Some((10, "evt_0"))),
                vec![update("evt_1", 9, grace())],
                Some((false, None)),
            ),
            (
                linked(Some((10, "evt_1"))),
                vec![update("evt_1", 10, grace())],
                Some((false, None)),
            ),
            // Same second, or unknown provenance: Stripe is asked, one by one.
            (
                linked(Some((10, "evt_0"))),
                vec![update("evt_1", 10, grace())],
                None,
            ),
            (
                linked(Some((10, "evt_0"))),
                vec![update(
                    "evt_1",
                    11,
                    Some(snapshot_json("Grace Hopper", None)),
                )],
                None,
            ),
            // The folded snapshot is compared with as if applied just before.
            (
                linked(Some((10, "evt_0"))),
                vec![update("evt_1", 11, None), update("evt_2", 11, grace())],
                None,
            ),
            (
                linked(Some((10, "evt_0"))),
                vec![update("evt_1", 11, None), update("evt_2", 12, grace())],
                Some((true, Some((12, "evt_2")))),
            ),
        ];
        for (index, (context, events, expected)) in cases.into_iter().enumerate() {
            let ids = events
                .iter()
                .map(|e| e.event.id.clone())
                .collect::<Vec<_>>();
            let plan = plan_batched_update(context, &events);
            let got = plan.map(|update| {
                assert_eq!(update.customer_id, "cus_1", "case {index}");
                assert_eq!(update.events, ids, "case {index}: every event is finished");
                (update.profile.is_some(), update.watermark)
            });
            let expected = expected.map(|(writes, watermark)| {
                (
                    writes,
                    watermark.map(|(at, id): (i64, &str)| (at, id.to_owned())),
                )
            });
            assert_eq!(got, expected, "case {index}");
        }
    }
}
