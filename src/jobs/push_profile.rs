//! The profile push: sends a user's local profile to their Stripe customer.

use std::{collections::BTreeMap, sync::Arc};

use time::format_description::well_known::Rfc3339;

use super::worker::JobHandler;
use crate::{
    domain::{full_name, UserId},
    retry::JobFailure,
    store::{OutboxJob, PushedProfile, Store},
    stripe::{CustomerParams, StripeClient, METADATA_PROFILE_VERSION},
};

pub struct PushProfile {
    store: Arc<dyn Store>,
    stripe: StripeClient,
}

impl PushProfile {
    pub fn new(store: Arc<dyn Store>, stripe: StripeClient) -> Self {
        Self { store, stripe }
    }
}

#[async_trait::async_trait]
impl JobHandler for PushProfile {
    /// Pushes the user's *current* email, name and phone: a job that runs late still sends
    /// the newest values, and a burst of edits collapses into one push.
    async fn run(&self, job: &OutboxJob) -> Result<(), JobFailure> {
        let Ok(user_id) = UserId::parse(&job.user_id) else {
            return Ok(());
        };
        let Some(user) = self.store.get_user(&user_id).await? else {
            return Ok(()); // erased since: nothing to push
        };
        let Some(link) = self.store.get_link(&user_id).await? else {
            return Ok(()); // no customer yet: it will be created with these values
        };
        let name = full_name(user.first_name.as_ref(), user.last_name.as_ref());
        let phone = user.phone.as_ref().map(ToString::to_string);
        let now = time::OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .expect("UTC formats as RFC 3339");
        let params = CustomerParams {
            email: Some(user.email.to_string()),
            // An empty value clears the field in Stripe.
            name: Some(name.clone().unwrap_or_default()),
            phone: Some(phone.clone().unwrap_or_default()),
            metadata: BTreeMap::from([
                ("last_profile_sync".to_owned(), now),
                ("synced_from".to_owned(), "billsync".to_owned()),
                // Which local version these values are: the echo of this push, however
                // late, is recognised as billsync's own (see `webhooks::apply`).
                (
                    METADATA_PROFILE_VERSION.to_owned(),
                    user.version.to_string(),
                ),
            ]),
        };
        // An erasure started since: no push may reach Stripe after its scrub (and while this
        // job is in flight, the erasure waits for it).
        if self.store.active_erase(&user_id).await?.is_some() {
            tracing::info!("erasure under way: push dropped");
            return Ok(());
        }
        // One key per claim: the client's own retries of this request reuse it, but a new
        // attempt (a reclaim, an operator's retry) never sends an old key with a new body.
        let key = format!(
            "billsync-push-{}-{}",
            job.id,
            job.claim_token.as_deref().unwrap_or("unclaimed")
        );
        self.stripe
            .update_customer(link.customer_id.as_str(), &params, Some(&key))
            .await?;
        self.store
            .record_push(
                &user_id,
                &PushedProfile {
                    email: user.email.to_string(),
                    name,
                    phone,
                    version: user.version,
                },
            )
            .await?;
        tracing::info!(customer_id = %link.customer_id, version = user.version, "profile pushed");
        Ok(())
    }
}
