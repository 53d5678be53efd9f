//! The link between a user and their Stripe customer, and the claim on creating one.

use time::OffsetDateTime;

use super::{LinkSource, StripeCustomerId, UserId};

#[derive(Debug, Clone, PartialEq)]
pub struct CustomerLink {
    pub user_id: UserId,
    pub customer_id: StripeCustomerId,
    pub livemode: bool,
    pub linked_via: LinkSource,
    pub linked_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LinkOutcome {
    /// The link was written.
    Linked(CustomerLink),
    /// The user already had a link (returned); nothing was written.
    UserAlreadyLinked(CustomerLink),
    /// The customer is linked to another user; nothing was written.
    CustomerTaken { other_user: UserId },
    /// The user does not exist.
    UserMissing,
    /// The customer was deleted in Stripe (see `record_deleted_customer`); nothing was written.
    CustomerDeleted,
}

/// A held claim on creating a user's customer.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolveClaim {
    /// When the first attempt began; kept across failed attempts so a retried create is the
    /// same request (same metadata, same idempotency key).
    pub started_at: OffsetDateTime,
    /// The first attempt's create parameters (JSON), resent unchanged by every retry.
    pub create_params: Option<String>,
}
