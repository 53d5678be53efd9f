//! A user as billsync mirrors it, and what was last sent to their customer.

use time::OffsetDateTime;

use super::{Email, PersonName, Phone, UserId, ValidationError};

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

impl UserUpsert {
    /// A user as the admin API and the import take one: an empty or absent name or phone is
    /// none; each field checked as its newtype checks it.
    pub fn parse(
        id: UserId,
        email: &str,
        email_verified: bool,
        first_name: Option<&str>,
        last_name: Option<&str>,
        phone: Option<&str>,
    ) -> Result<Self, ValidationError> {
        Ok(Self {
            id,
            email: Email::parse(email)?,
            email_verified,
            first_name: PersonName::parse_optional(first_name, "first_name")?,
            last_name: PersonName::parse_optional(last_name, "last_name")?,
            phone: phone
                .filter(|p| !p.trim().is_empty())
                .map(Phone::parse)
                .transpose()?,
        })
    }
}

/// One user of a bulk import.
#[derive(Debug, Clone, PartialEq)]
pub struct UserImport {
    pub user: UserUpsert,
    /// The user id's keyed hash, as erasure tombstones hold it: an erased person is never
    /// created again by an import (checked inside the importing transaction). One who has an
    /// account again (a row, made by a token issued after the erasure) is updated as usual.
    pub subject: String,
}

/// What a bulk import did with one user.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportOutcome {
    Created(User),
    /// A field changed: like an admin `PUT`, a profile push is queued and `user.updated` written.
    Updated(User),
    Unchanged(User),
    /// Erased, and without an account since: not created.
    Erased,
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
