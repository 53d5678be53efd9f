//! The applier: applies stored events per customer, in order of Stripe's `created` (then
//! arrival), one worker per customer at a time across every instance (a lease row), with a
//! watermark so an older snapshot never overwrites a newer one. A same-second tie is settled
//! by re-fetching the customer from Stripe, so neither event's change is lost. A failing event
//! is retried with backoff and holds back only its own customer's later events.
//!
//! `schedule` is the loop: it leases customers and sends each down one of two paths, `batch`
//! (customers with only `customer.updated` waiting, many in one transaction) or `one_by_one`
//! (a customer's events in order, each by its `handlers` entry). What either path writes is
//! decided by the pure `rules`: ordering against the watermark, whose values a snapshot
//! carries, and how a Stripe customer merges into a user.

mod batch;
mod handlers;
mod one_by_one;
mod rules;
mod schedule;

pub use schedule::{Applier, MAX_CONCURRENT_CUSTOMERS};

use crate::store::EventToApply;

/// A customer and its waiting events, in apply order.
type CustomerQueue = (String, Vec<EventToApply>);

/// Counts events finished (either path) and how long the newest of them waited.
fn record_applied(newest: &EventToApply, events: usize) {
    metrics::counter!("billsync_webhook_events_applied_total").increment(events as u64);
    metrics::histogram!("billsync_webhook_apply_lag_seconds").record(
        (time::OffsetDateTime::now_utc() - newest.event.received_at)
            .as_seconds_f64()
            .max(0.0),
    );
}
