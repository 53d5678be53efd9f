//! A user as billsync mirrors it, and what was last sent to their customer.

use time::OffsetDateTime;

use super::{Email, PersonName, Phone, UserId};

/// A user of the application, as billsync mirrors it.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: UserId,
    pub email: Email,
    pub email_verified: bool,
    pub first_name: Option<PersonName>,
    pub last_name: Option<PersonName>,
    pub phone: Option<Phone>,
    /// Increases on every change of the fields above.
    pub version: i64,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// The desired state of a user, for create-or-replace.
#[derive(Debug, Clone, PartialEq)]
pub struct UserUpsert {
    pub id: UserId,
    pub email: Email,
    pub email_verified: bool,
    pub first_name: Option<PersonName>,
    pub last_name: Option<PersonName>,
    pub phone: Option<Phone>,
}

/// What billsync last sent to a customer, to tell its own echo from a Stripe-side change.
#[derive(Debug, Clone, PartialEq)]
pub struct PushedProfile {
    pub email: String,
    pub name: Option<String>,
    pub phone: Option<String>,
    pub version: i64,
}

/// A Stripe-side profile change to write, if the user is still at `expected`.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteProfile {
    pub user: UserUpsert,
    pub expected: i64,
    /// The snapshot's values, recorded as what Stripe holds.
    pub pushed: PushedProfile,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub id: i64,
    pub metric: String,
    pub quantity: i64,
    pub recorded_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
}
