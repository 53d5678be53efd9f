//! One conformance suite, run against every store backend; one module per aggregate, as
//! the store's traits are. A single test binary.

/// The shared helpers this binary uses (`tests/support/`): only these pieces, so none is dead.
#[macro_use]
#[path = "../support"]
mod support {
    #[path = "stores.rs"]
    mod stores;
    pub use stores::*;
    #[macro_use]
    #[path = "backends.rs"]
    mod backends;
    pub use backends::*;
}

mod app_events;
mod erasure;
mod events;
mod import;
mod links;
mod operations;
mod outbox;
mod reconcile_runs;
mod resolve_claims;
mod subscriptions;
mod users;

use std::{sync::Arc, time::Duration};

use billsync::store::prelude::*;
use billsync::{
    domain::{Email, LinkSource, PersonName, Phone, StripeCustomerId, UnlinkReason, UserId},
    store::{
        Erased, EventToApply, JobKind, JobOutcome, JobState, LinkOutcome, PushedProfile, Store,
        StoreError, StoreOptions, StoreResult, SubscriptionMirror, UserUpsert,
    },
};
use support::Backend;

fn upsert(id: &str, email: &str) -> UserUpsert {
    UserUpsert {
        id: UserId::parse(id).unwrap(),
        email: Email::parse(email).unwrap(),
        email_verified: false,
        first_name: None,
        last_name: None,
        phone: None,
    }
}

fn cus(id: &str) -> StripeCustomerId {
    StripeCustomerId::parse(id).unwrap()
}

/// One-customer forms of the batch methods, as the suite asserts them; written on the live
/// batch methods, which the store no longer duplicates.
trait OneCustomer {
    async fn customer_events(&self, customer: &str, limit: u32) -> StoreResult<Vec<EventToApply>>;
    async fn try_lease_customer(
        &self,
        customer: &str,
        holder: &str,
        lease: Duration,
    ) -> StoreResult<bool>;
    async fn release_customer(&self, customer: &str, holder: &str) -> StoreResult<()>;
    async fn link_watermark(&self, customer: &str) -> StoreResult<Option<(i64, Option<String>)>>;
}

impl<S: Store + ?Sized> OneCustomer for S {
    async fn customer_events(&self, customer: &str, limit: u32) -> StoreResult<Vec<EventToApply>> {
        let mut found = self.customers_events(&[customer.to_owned()], limit).await?;
        Ok(found.pop().map(|(_, events)| events).unwrap_or_default())
    }
    async fn try_lease_customer(
        &self,
        customer: &str,
        holder: &str,
        lease: Duration,
    ) -> StoreResult<bool> {
        let leased = self
            .try_lease_customers(&[customer.to_owned()], holder, lease)
            .await?;
        Ok(!leased.is_empty())
    }
    async fn release_customer(&self, customer: &str, holder: &str) -> StoreResult<()> {
        self.release_customers(&[customer.to_owned()], holder).await
    }
    /// The applier reads a link's watermark with its update context.
    async fn link_watermark(&self, customer: &str) -> StoreResult<Option<(i64, Option<String>)>> {
        let mut contexts = self.update_contexts(&[customer.to_owned()]).await?;
        Ok(contexts.pop().and_then(|c| c.watermark))
    }
}

/// Waits out the push debounce (300 ms by default).
async fn after_debounce() {
    tokio::time::sleep(Duration::from_millis(350)).await;
}

fn new_event(id: &str, created: i64, customer: &str) -> billsync::store::NewEvent {
    billsync::store::NewEvent {
        id: id.into(),
        kind: "customer.updated".into(),
        created,
        livemode: false,
        customer_id: Some(customer.into()),
        payload: format!("{{\"id\":\"{id}\"}}"),
        state: billsync::store::EventState::Pending,
    }
}
