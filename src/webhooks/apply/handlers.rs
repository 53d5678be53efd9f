//! The handlers, one per event type: what an event, in its turn, changes locally. Each
//! judges by the `rules`; a same-second tie or a snapshot of unknown provenance is settled
//! by asking Stripe for the current state.

use serde_json::Value;

use super::rules::{order, profile_write, Order, Verdict};
use crate::{
    domain::{LinkSource, StripeCustomerId, UnlinkReason, UserId},
    retry::JobFailure,
    store::{EventToApply, Store},
    stripe::{Customer, StripeClient, Subscription},
};

pub(super) const CUSTOMER_UPDATED: &str = "customer.updated";

/// What the handlers read and write.
pub(super) struct Handlers<'a> {
    pub store: &'a dyn Store,
    pub stripe: &'a StripeClient,
}

impl Handlers<'_> {
    /// Applies one event by its type; an unknown type changes nothing. `superseded` is the
    /// newest `customer.updated` folded into this one (see `one_by_one::apply_customer`).
    #[tracing::instrument(skip_all, fields(event_id = %event.event.id, kind = %event.event.kind))]
    pub(super) async fn apply(
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
            self.store
                .remove_link(&link.user_id, UnlinkReason::DeletedInStripe)
                .await?;
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
        let mirror = sub.into_mirror(user);
        self.store
            .upsert_subscription_if_newer(&mirror, created, event_id)
            .await?;
        Ok(())
    }
}

/// The event's `data.object`, from its stored payload.
pub(super) fn event_object(event: &EventToApply) -> Result<Value, JobFailure> {
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

pub(super) fn parse<T: serde::de::DeserializeOwned>(object: Value) -> Result<T, JobFailure> {
    serde_json::from_value(object).map_err(|e| JobFailure::Permanent(format!("event object: {e}")))
}
