//! Domain newtypes: every input is parsed into one of these at the edge, so the rest of the
//! code never handles an unvalidated string. The entities billsync keeps (users, links, jobs,
//! events, the billing mirror) are defined here too; `store` persists them.

use std::fmt;

use serde::{Serialize, Serializer};

mod app_event;
mod app_event_data;
mod billing;
mod event;
mod job;
mod link;
mod reconcile_run;
mod user;

pub use app_event::{
    changed_fields, new_app_event_id, AppEvent, AppEventBody, AppEventOutcome, AppEventState,
    AppEventType, ChangeOrigin, NewAppEvent, UnlinkReason, PROFILE_FIELDS,
};
pub use app_event_data::{
    CustomerLinkedData, CustomerUnlinkedData, PlanChangedData, SubscriptionChangeData,
    SubscriptionItemSnapshot, SubscriptionSnapshot, SyncFailedData, UserErasedData, UserSnapshot,
    UserUpdatedData,
};
pub use billing::{
    previous_values, PortalConfigRecord, SubscriptionItemMirror, SubscriptionMirror,
};
pub use event::{
    CustomerUpdate, EventOutcome, EventState, EventToApply, NewEvent, StoredEvent, UpdateContext,
};
pub use job::{failure_code, AuditEntry, Erased, JobKind, JobOutcome, JobState, OutboxJob};
pub use link::{CustomerLink, LinkOutcome, ResolveClaim};
pub use reconcile_run::ReconcileRunRecord;
pub use user::{
    ImportOutcome, PushedProfile, RemoteProfile, UsageRecord, User, UserImport, UserUpsert,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    /// Stable machine-readable code, returned to API clients.
    pub code: &'static str,
    pub message: String,
}

impl ValidationError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

/// The application's user id: the JWT `sub` (Supabase uses UUIDs, but any opaque id works).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);
string_newtype!(UserId);

impl UserId {
    pub const MAX_LEN: usize = 255;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.is_empty() || raw.trim() != raw {
            return Err(ValidationError::new(
                "invalid_user_id",
                "user id must be non-empty and have no surrounding whitespace",
            ));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(ValidationError::new(
                "invalid_user_id",
                format!("user id must be at most {} bytes", Self::MAX_LEN),
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "invalid_user_id",
                "user id must not contain control characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }
}

/// An email address, normalised (trimmed, lowercased) so that comparisons see one spelling.
/// It also remembers how it was written where it came from, when that differs (`Ada@Example.com`):
/// Stripe's list `email` filter is case-sensitive, so a customer made with that spelling (by
/// Checkout, the Dashboard, the app's old code) is found only by asking for it as written. Two
/// spellings of one address are equal.
#[derive(Debug, Clone)]
pub struct Email(String, Option<String>);
string_newtype!(Email);

impl PartialEq for Email {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for Email {}

impl std::hash::Hash for Email {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let normalised = raw.trim().to_lowercase();
        let invalid = || ValidationError::new("invalid_email", "email address is not valid");
        if normalised.is_empty() || normalised.len() > Self::MAX_LEN {
            return Err(invalid());
        }
        let (local, domain) = normalised.rsplit_once('@').ok_or_else(invalid)?;
        let bad_char = |c: char| c.is_whitespace() || c.is_control() || "<>()[],;:\\\"".contains(c);
        if local.is_empty()
            || local.len() > 64
            || domain.len() < 3
            || !domain.contains('.')
            || domain.starts_with(['.', '-'])
            || domain.ends_with(['.', '-'])
            || domain.contains("..")
            || local.contains('@')
            || normalised.chars().any(bad_char)
        {
            return Err(invalid());
        }
        let trimmed = raw.trim();
        let as_given = (trimmed != normalised).then(|| trimmed.to_owned());
        Ok(Self(normalised, as_given))
    }

    /// The address as it was given, when that is not its normalised form.
    pub fn as_given(&self) -> Option<&str> {
        self.1.as_deref()
    }

    /// A stored address with its stored spelling; a spelling of another address is dropped.
    pub fn with_spelling(
        normalised: &str,
        as_given: Option<&str>,
    ) -> Result<Self, ValidationError> {
        let mut email = Self::parse(normalised)?;
        email.1 = as_given
            .and_then(|given| Self::parse(given).ok())
            .filter(|given| given.0 == email.0)
            .and_then(|given| given.1);
        Ok(email)
    }
}

/// A phone number in E.164 shape: `+` followed by 7 to 15 digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phone(String);
string_newtype!(Phone);

impl Phone {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let trimmed = raw.trim();
        let digits = trimmed.strip_prefix('+').unwrap_or("");
        if !(7..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValidationError::new(
                "invalid_phone",
                "phone must be in E.164 form: '+' followed by 7 to 15 digits",
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }
}

/// A first or last name: trimmed, at most 100 characters; empty means "no name".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonName(String);
string_newtype!(PersonName);

impl PersonName {
    pub const MAX_CHARS: usize = 100;

    /// `field` names the input in the error (`first_name`, `lastName`, ...).
    pub fn parse_optional(raw: Option<&str>, field: &str) -> Result<Option<Self>, ValidationError> {
        let Some(trimmed) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        if trimmed.chars().count() > Self::MAX_CHARS || trimmed.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "invalid_name",
                format!(
                    "{field} must be at most {} characters without control characters",
                    Self::MAX_CHARS
                ),
            ));
        }
        Ok(Some(Self(trimmed.to_owned())))
    }
}

/// The display name Stripe gets: first and last joined, `None` when both are empty.
pub fn full_name(first: Option<&PersonName>, last: Option<&PersonName>) -> Option<String> {
    let joined = format!(
        "{} {}",
        first.map(PersonName::as_str).unwrap_or(""),
        last.map(PersonName::as_str).unwrap_or("")
    );
    let trimmed = joined.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

/// A Stripe customer id (`cus_…`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StripeCustomerId(String);
string_newtype!(StripeCustomerId);

impl StripeCustomerId {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let ok = raw.len() > 4
            && raw.len() <= 255
            && raw.starts_with("cus_")
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(ValidationError::new(
                "invalid_customer_id",
                "not a Stripe customer id (cus_…)",
            ));
        }
        Ok(Self(raw.to_owned()))
    }
}

/// How a user came to be linked to their Stripe customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LinkSource {
    /// Already linked in the database.
    Existing,
    /// Found in Stripe through `metadata.userId`.
    StripeMetadata,
    /// Found in Stripe through a verified, unambiguous email match.
    StripeEmail,
    /// Created by billsync.
    Created,
}

impl LinkSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Existing => "existing",
            Self::StripeMetadata => "stripe_metadata",
            Self::StripeEmail => "stripe_email",
            Self::Created => "created",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [
            Self::Existing,
            Self::StripeMetadata,
            Self::StripeEmail,
            Self::Created,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_email_keeps_its_spelling_but_compares_normalised() {
        let given = Email::parse("  Ada@Example.COM ").unwrap();
        assert_eq!(given.as_given(), Some("Ada@Example.COM"));
        assert_eq!(Email::parse("ada@example.com").unwrap().as_given(), None);
        assert_eq!(given, Email::parse("ada@example.com").unwrap());
        let stored = Email::with_spelling("ada@example.com", Some("Ada@Example.COM")).unwrap();
        assert_eq!(stored.as_given(), Some("Ada@Example.COM"));
        assert_eq!(stored.as_str(), "ada@example.com");
        // A spelling of another address is not this one's.
        let other = Email::with_spelling("ada@example.com", Some("Bob@Example.com")).unwrap();
        assert_eq!(other.as_given(), None);
    }

    #[test]
    fn email_is_normalised_and_validated() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "ada@@example.com",
            "a da@example.com",
            "ada@exa..mple.com",
            "ada@.example.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(Email::parse("ad\u{7}a@example.com").is_err());
        assert!(Email::parse(&format!("{}@example.com", "a".repeat(65))).is_err());
    }

    #[test]
    fn phone_accepts_e164_only() {
        assert_eq!(
            Phone::parse("+14155550123").unwrap().as_str(),
            "+14155550123"
        );
        for bad in [
            "14155550123",
            "+1234",
            "+1234567890123456",
            "+1 415 555",
            "+14155550abc",
            "",
        ] {
            assert!(Phone::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn names_are_trimmed_bounded_and_joined() {
        let first = PersonName::parse_optional(Some(" Ada "), "first_name").unwrap();
        let last = PersonName::parse_optional(Some(""), "last_name").unwrap();
        assert_eq!(first.as_ref().unwrap().as_str(), "Ada");
        assert_eq!(last, None);
        assert_eq!(
            full_name(first.as_ref(), last.as_ref()).as_deref(),
            Some("Ada")
        );
        assert_eq!(full_name(None, None), None);
        let long = "é".repeat(101);
        let err = PersonName::parse_optional(Some(&long), "lastName").unwrap_err();
        assert!(err.message.contains("lastName"));
        assert!(PersonName::parse_optional(Some(&"é".repeat(100)), "x").is_ok());
    }

    #[test]
    fn user_and_customer_ids_are_checked() {
        assert!(UserId::parse("3f2a-uuid").is_ok());
        assert!(
            UserId::parse("'; DROP TABLE users; --").is_ok(),
            "opaque ids are data, not SQL"
        );
        for bad in ["", " padded", "a\u{0}b", &"x".repeat(256)] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(StripeCustomerId::parse("cus_ABC123").is_ok());
        for bad in ["cus_", "sub_123", "cus_a/b", "cus_a b"] {
            assert!(
                StripeCustomerId::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn link_source_round_trips() {
        for s in [
            LinkSource::Existing,
            LinkSource::StripeMetadata,
            LinkSource::StripeEmail,
            LinkSource::Created,
        ] {
            assert_eq!(LinkSource::parse(s.as_str()), Some(s));
        }
        assert_eq!(LinkSource::parse("other"), None);
    }
}
