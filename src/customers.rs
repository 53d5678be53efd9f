//! Customer resolution: the spec's `getOrCreateStripeCustomer`, race-free and safe.
//!
//! Order: the database link; then a Stripe customer whose `metadata.userId` is this user (left
//! by an earlier attempt that crashed before linking); then an email match under the linking
//! policy (design §3.2); else a new customer. Creation happens under a per-user claim: an
//! in-process lock, then a lease row in the database shared by every instance, and the create
//! request carries an idempotency key derived from the user and the exact request.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::Serialize;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;

use crate::{
    domain::{full_name, LinkSource, StripeCustomerId, UserId},
    keyed_lock::KeyedLock,
    store::{LinkOutcome, ResolveClaim, Store, StoreError, User},
    stripe::{Customer, CustomerParams, StripeClient, StripeError, METADATA_USER_ID},
};

/// `metadata.source` on customers billsync creates.
pub const CUSTOMER_SOURCE: &str = "billsync";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolved {
    pub customer_id: StripeCustomerId,
    pub source: LinkSource,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("user not found")]
    UserNotFound,
    #[error("another resolve for this user did not finish in time")]
    Busy,
    #[error("the user's account is being deleted")]
    ErasurePending,
    #[error(transparent)]
    Stripe(#[from] StripeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stripe returned an unusable customer id {0:?}")]
    BadCustomerId(String),
}

#[derive(Clone)]
pub struct CustomerResolver {
    store: Arc<dyn Store>,
    stripe: StripeClient,
    local: KeyedLock,
    /// Identifies this process as a claim holder.
    holder: String,
    lease: Duration,
    livemode: bool,
}

impl CustomerResolver {
    pub fn new(
        store: Arc<dyn Store>,
        stripe: StripeClient,
        lease: Duration,
        livemode: bool,
    ) -> Self {
        Self {
            store,
            stripe,
            local: KeyedLock::default(),
            holder: format!("billsync-{}", uuid::Uuid::new_v4()),
            lease,
            livemode,
        }
    }

    /// The user's Stripe customer, found or created. Exactly one per user, however many calls
    /// race: all of them return the same id.
    #[tracing::instrument(skip_all, fields(user_id = %user_id))]
    pub async fn resolve(&self, user_id: &UserId) -> Result<Resolved, ResolveError> {
        if let Some(link) = self.store.get_link(user_id).await? {
            return Ok(existing(link.customer_id));
        }
        let _local = self.local.lock(user_id.as_str()).await;
        let claim = match self.claim(user_id).await? {
            Claimed::Already(resolved) => return Ok(resolved),
            Claimed::Held(claim) => claim,
        };
        let result = self.resolve_claimed(user_id, &claim).await;
        // A final 5xx is replayed by Stripe for 24 h under the same idempotency key: start the
        // next attempt afresh (its list-by-metadata step still finds anything this one made).
        let server_error =
            matches!(&result, Err(ResolveError::Stripe(StripeError::Api(e))) if e.status >= 500);
        if let Err(err) = self
            .store
            .release_resolve(user_id, &self.holder, result.is_ok() || server_error)
            .await
        {
            // The lease expires by itself; the next attempt takes it over.
            tracing::warn!(error = %err, "could not release resolve claim");
        }
        result
    }

    /// Waits for the cross-instance claim, or for another holder to finish the link.
    async fn claim(&self, user_id: &UserId) -> Result<Claimed, ResolveError> {
        let deadline = tokio::time::Instant::now() + self.lease + Duration::from_secs(5);
        let mut pause = Duration::from_millis(20);
        loop {
            if let Some(link) = self.store.get_link(user_id).await? {
                return Ok(Claimed::Already(existing(link.customer_id)));
            }
            if self.store.get_user(user_id).await?.is_none() {
                return Err(ResolveError::UserNotFound);
            }
            if let Some(claim) = self
                .store
                .try_claim_resolve(user_id, &self.holder, self.lease)
                .await?
            {
                return Ok(Claimed::Held(claim));
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(ResolveError::Busy);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    async fn resolve_claimed(
        &self,
        user_id: &UserId,
        claim: &ResolveClaim,
    ) -> Result<Resolved, ResolveError> {
        // Another instance may have linked between our check and our claim.
        if let Some(link) = self.store.get_link(user_id).await? {
            return Ok(existing(link.customer_id));
        }
        let user = self
            .store
            .get_user(user_id)
            .await?
            .ok_or(ResolveError::UserNotFound)?;
        // No new customer for someone being erased (one linked meanwhile anyway is found and
        // handled by the erasure's last transaction).
        if self.store.active_erase(user_id).await?.is_some() {
            return Err(ResolveError::ErasurePending);
        }

        let candidates = self.candidates(&user).await?;
        for (customer, via) in self.pick_existing(&user, &candidates).await? {
            let linked = self
                .link(&user, &customer.id, customer.livemode, via)
                .await?;
            let Some(resolved) = linked else { continue };
            if via == LinkSource::StripeEmail {
                self.stamp_user_id(&user.id, &customer.id).await;
            }
            return Ok(resolved);
        }

        if self.store.active_erase(&user.id).await?.is_some() {
            return Err(ResolveError::UserNotFound); // being erased: create nothing
        }
        // Every attempt of this claim sends the first attempt's request, with one key: a create
        // whose answer was lost is answered with the same customer, even after a profile edit.
        let params = match claim.create_params.as_deref().map(serde_json::from_str) {
            Some(Ok(params)) => params,
            _ => {
                let params = create_params(&user, claim);
                let json = serde_json::to_string(&params).expect("customer params serialize");
                self.store
                    .save_claim_params(&user.id, &self.holder, &json)
                    .await?;
                params
            }
        };
        let key = creation_idempotency_key(&user.id, claim);
        let customer = self.stripe.create_customer(&params, &key).await?;
        tracing::info!(customer_id = %customer.id, "created stripe customer");
        match self
            .link(&user, &customer.id, customer.livemode, LinkSource::Created)
            .await
        {
            Ok(Some(resolved)) => Ok(resolved),
            Err(ResolveError::UserNotFound) => {
                // Erased while we created: the new customer must not outlive the user.
                tracing::warn!(customer_id = %customer.id, "user erased during creation: deleting the new customer");
                if let Err(err) = self.stripe.delete_customer(&customer.id).await {
                    tracing::error!(customer_id = %customer.id, error = %err, "could not delete the orphan customer");
                }
                Err(ResolveError::UserNotFound)
            }
            Ok(None) => Err(ResolveError::Store(StoreError::Corrupt(format!(
                // A brand-new customer cannot be linked elsewhere; if it is, the data is wrong.
                "new customer {} already linked to another user",
                customer.id
            )))),
            Err(other) => Err(other),
        }
    }

    /// The Stripe customers this user might already have: those listed under the user's
    /// (normalised) email; when none of them was made for this user, also those the Search
    /// API finds by `metadata.userId` (made for this user, their email changed since) and by
    /// email (Stripe's list filter is case-sensitive: `Ada@Example.com` is not listed under
    /// `ada@example.com`). Search lags and may be absent; the claim and the create's
    /// idempotency key, not search, are what prevent duplicates.
    async fn candidates(&self, user: &User) -> Result<Vec<Customer>, ResolveError> {
        let mut candidates = self.stripe.customers_by_email(user.email.as_str()).await?;
        // Stripe's filter is case-sensitive: a customer made with the address as the app wrote
        // it (`Ada@Example.com`, by Checkout or the app's old code) is listed only under that.
        if let Some(as_given) = user.email.as_given() {
            for customer in self.stripe.customers_by_email(as_given).await? {
                if !candidates.iter().any(|c| c.id == customer.id) {
                    candidates.push(customer);
                }
            }
        }
        if candidates
            .iter()
            .any(|c| c.user_id_metadata() == Some(user.id.as_str()))
        {
            return Ok(candidates);
        }
        let by_metadata = format!(
            "metadata[\"{}\"]:\"{}\"",
            METADATA_USER_ID,
            search_literal(user.id.as_str())
        );
        let by_email = format!("email:\"{}\"", search_literal(user.email.as_str()));
        for query in [by_metadata, by_email] {
            let Some(found) = self.stripe.search_customers(&query).await? else {
                break; // no search here
            };
            for customer in found {
                // Search matches loosely; only exact ids and case-insensitively equal
                // emails count.
                let ours = customer.user_id_metadata() == Some(user.id.as_str());
                let same_email = customer
                    .email
                    .as_deref()
                    .is_some_and(|e| e.trim().eq_ignore_ascii_case(user.email.as_str()));
                if (ours || same_email) && !candidates.iter().any(|c| c.id == customer.id) {
                    candidates.push(customer);
                }
            }
            if candidates
                .iter()
                .any(|c| c.user_id_metadata() == Some(user.id.as_str()))
            {
                break; // made for this user: nothing to look for by email
            }
        }
        candidates.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        Ok(candidates)
    }

    /// The existing customers this user may be linked to, best first: customers made for this
    /// user (`metadata.userId`), then a lone verified email match.
    async fn pick_existing<'c>(
        &self,
        user: &User,
        candidates: &'c [Customer],
    ) -> Result<Vec<(&'c Customer, LinkSource)>, ResolveError> {
        let usable: Vec<&Customer> = candidates
            .iter()
            .filter(|c| c.livemode == self.livemode && !c.deleted)
            .collect();
        let mut picks: Vec<(&Customer, LinkSource)> = usable
            .iter()
            .filter(|c| c.user_id_metadata() == Some(user.id.as_str()))
            .map(|c| (*c, LinkSource::StripeMetadata))
            .collect();
        if picks.len() > 1 {
            tracing::warn!(
                customers = ?picks.iter().map(|(c, _)| c.id.as_str()).collect::<Vec<_>>(),
                "several stripe customers carry this user's id; linking the oldest"
            );
        }
        if !picks.is_empty() {
            return Ok(picks);
        }
        match usable.as_slice() {
            [] => {}
            [only] if user.email_verified && only.user_id_metadata().is_none() => {
                picks.push((only, LinkSource::StripeEmail));
            }
            several => {
                let reason = if !user.email_verified {
                    "email not verified"
                } else if several.len() > 1 {
                    "several customers share this email"
                } else {
                    "customer belongs to another user"
                };
                tracing::warn!(
                    candidates = ?several.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
                    reason,
                    "possible duplicate customer: email match not linked, creating a new customer"
                );
            }
        }
        Ok(picks)
    }

    /// Marks a customer linked by email as this user's, so it is never linked to anyone else
    /// by email later (after an unlink, say). Best effort: the link stands either way.
    async fn stamp_user_id(&self, user: &UserId, customer: &str) {
        let params = CustomerParams {
            metadata: BTreeMap::from([(METADATA_USER_ID.to_owned(), user.to_string())]),
            ..Default::default()
        };
        if let Err(err) = self.stripe.update_customer(customer, &params, None).await {
            tracing::warn!(customer_id = customer, error = %err, "could not stamp metadata.userId");
        }
    }

    /// Links, or says (`None`) that the customer belongs to another user.
    async fn link(
        &self,
        user: &User,
        customer_id: &str,
        livemode: bool,
        via: LinkSource,
    ) -> Result<Option<Resolved>, ResolveError> {
        let customer = StripeCustomerId::parse(customer_id)
            .map_err(|_| ResolveError::BadCustomerId(customer_id.to_owned()))?;
        match self
            .store
            .insert_link(&user.id, &customer, livemode, via)
            .await?
        {
            LinkOutcome::Linked(link) => {
                tracing::info!(customer_id = %link.customer_id, linked_via = via.as_str(), "linked customer");
                Ok(Some(Resolved {
                    customer_id: link.customer_id,
                    source: via,
                }))
            }
            LinkOutcome::UserAlreadyLinked(link) => Ok(Some(existing(link.customer_id))),
            LinkOutcome::CustomerTaken { .. } => {
                tracing::warn!(
                    customer_id,
                    "candidate customer is linked to another user; skipped"
                );
                Ok(None)
            }
            LinkOutcome::CustomerDeleted => {
                tracing::warn!(
                    customer_id,
                    "candidate customer was deleted in Stripe; skipped"
                );
                Ok(None)
            }
            LinkOutcome::UserMissing => Err(ResolveError::UserNotFound),
        }
    }
}

enum Claimed {
    Already(Resolved),
    Held(ResolveClaim),
}

fn existing(customer_id: StripeCustomerId) -> Resolved {
    Resolved {
        customer_id,
        source: LinkSource::Existing,
    }
}

/// A value inside a Search API string literal: quotes and backslashes escaped.
fn search_literal(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The create request. `created_at` is the claim's first start, so every retry of this
/// user's creation sends identical parameters.
fn create_params(user: &User, claim: &ResolveClaim) -> CustomerParams {
    let mut metadata = BTreeMap::new();
    metadata.insert(METADATA_USER_ID.to_owned(), user.id.to_string());
    metadata.insert("source".to_owned(), CUSTOMER_SOURCE.to_owned());
    metadata.insert(
        "created_at".to_owned(),
        claim
            .started_at
            .format(&Rfc3339)
            .expect("a UTC timestamp formats as RFC 3339"),
    );
    CustomerParams {
        email: Some(user.email.to_string()),
        name: full_name(user.first_name.as_ref(), user.last_name.as_ref()),
        phone: user.phone.as_ref().map(ToString::to_string),
        metadata,
    }
}

/// One key per user and claim: every retry of a claim (after a crash or a lost answer) sends
/// it with the claim's recorded request, and Stripe returns the first customer instead of
/// making a second (it keeps keys 24 h).
pub fn creation_idempotency_key(user: &UserId, claim: &ResolveClaim) -> String {
    let mut hash = Sha256::new();
    hash.update(user.as_str().as_bytes());
    hash.update([0]);
    hash.update(claim.started_at.unix_timestamp_nanos().to_be_bytes());
    format!(
        "billsync-customer-create-{}",
        &hex::encode(hash.finalize())[..48]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Email, PersonName};

    fn user(first: Option<&str>, last: Option<&str>) -> User {
        User {
            id: UserId::parse("user-1").unwrap(),
            email: Email::parse("Ada@Example.com").unwrap(),
            email_verified: true,
            first_name: PersonName::parse_optional(first, "first_name").unwrap(),
            last_name: PersonName::parse_optional(last, "last_name").unwrap(),
            phone: None,
            version: 1,
            created_at: crate::store::now(),
            updated_at: crate::store::now(),
        }
    }

    #[test]
    fn create_params_carry_email_joined_name_and_metadata() {
        let claim = ResolveClaim {
            started_at: time::macros::datetime!(2026-11-26 10:00:00 UTC),
            create_params: None,
        };
        let params = create_params(&user(Some("Ada"), Some("Lovelace")), &claim);
        assert_eq!(params.email.as_deref(), Some("ada@example.com"));
        assert_eq!(params.name.as_deref(), Some("Ada Lovelace"));
        assert_eq!(params.metadata["userId"], "user-1");
        assert_eq!(params.metadata["source"], "billsync");
        assert_eq!(params.metadata["created_at"], "2026-11-26T10:00:00Z");
        assert_eq!(
            create_params(&user(None, Some("Lovelace")), &claim)
                .name
                .as_deref(),
            Some("Lovelace")
        );
        assert_eq!(create_params(&user(None, None), &claim).name, None);
    }

    #[test]
    fn search_literals_are_escaped() {
        assert_eq!(search_literal("plain-id"), "plain-id");
        assert_eq!(search_literal(r#"a"b\c"#), r#"a\"b\\c"#);
    }

    #[test]
    fn idempotency_key_is_one_per_user_and_claim() {
        let claim = ResolveClaim {
            started_at: time::macros::datetime!(2026-11-26 10:00:00 UTC),
            create_params: None,
        };
        let u = user(Some("Ada"), None);
        let a = creation_idempotency_key(&u.id, &claim);
        assert_eq!(a, creation_idempotency_key(&u.id, &claim));
        assert!(a.len() <= 255);
        assert_ne!(
            a,
            creation_idempotency_key(&UserId::parse("user-2").unwrap(), &claim)
        );
        let later = ResolveClaim {
            started_at: time::macros::datetime!(2026-11-26 10:00:01 UTC),
            create_params: None,
        };
        assert_ne!(a, creation_idempotency_key(&u.id, &later));
    }
}
