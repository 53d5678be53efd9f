//! Rows as both backends select them, decoded into the domain's entities.

use super::dialect::{time, Db, Time};
use crate::{
    domain::{
        CustomerLink, Email, EventState, EventToApply, JobKind, JobState, LinkSource, OutboxJob,
        PersonName, Phone, StoredEvent, StripeCustomerId, User, UserId,
    },
    store::{StoreError, StoreResult},
};

/// `{user_columns}`.
pub(crate) type UserRow = (
    String,
    String,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    Time,
    Time,
    Option<String>,
);

pub(crate) fn user_from_row(row: UserRow) -> StoreResult<User> {
    let (id, email, email_verified, first, last, phone, version, created, updated, as_given) = row;
    let corrupt = |e: crate::domain::ValidationError| StoreError::Corrupt(e.message);
    Ok(User {
        id: UserId::parse(&id).map_err(corrupt)?,
        email: Email::with_spelling(&email, as_given.as_deref()).map_err(corrupt)?,
        email_verified,
        first_name: PersonName::parse_optional(first.as_deref(), "first_name").map_err(corrupt)?,
        last_name: PersonName::parse_optional(last.as_deref(), "last_name").map_err(corrupt)?,
        phone: phone
            .as_deref()
            .map(Phone::parse)
            .transpose()
            .map_err(corrupt)?,
        version,
        created_at: time(created)?,
        updated_at: time(updated)?,
    })
}

/// `{link_columns}`.
pub(crate) type LinkRow = (String, String, bool, String, Time);

pub(crate) fn link_from_row(row: LinkRow) -> StoreResult<CustomerLink> {
    let (user_id, customer_id, livemode, linked_via, linked_at) = row;
    Ok(CustomerLink {
        user_id: UserId::parse(&user_id).map_err(|e| StoreError::Corrupt(e.message))?,
        customer_id: StripeCustomerId::parse(&customer_id)
            .map_err(|e| StoreError::Corrupt(e.message))?,
        livemode,
        linked_via: LinkSource::parse(&linked_via)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown linked_via {linked_via:?}")))?,
        linked_at: time(linked_at)?,
    })
}

/// `{job_columns}`.
pub(crate) type JobRow = (
    i64,
    String,
    String,
    String,
    String,
    i32,
    Option<String>,
    Option<String>,
    Time,
    Time,
    Time,
);

pub(crate) fn job_from_row(row: JobRow) -> StoreResult<OutboxJob> {
    let (id, kind, user_id, payload, state, attempts, last_error, token, next, created, updated) =
        row;
    Ok(OutboxJob {
        id,
        kind: JobKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("job kind {kind:?}")))?,
        user_id,
        payload: serde_json::from_str(&payload)
            .map_err(|e| StoreError::Corrupt(format!("job {id} payload: {e}")))?,
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("job state {state:?}")))?,
        attempts,
        claim_token: token,
        next_attempt_at: time(next)?,
        last_error,
        created_at: time(created)?,
        updated_at: time(updated)?,
    })
}

/// `{event_columns}`.
pub(crate) type EventRow = (
    String,
    String,
    i64,
    bool,
    Option<String>,
    String,
    i32,
    Option<String>,
    Time,
);

pub(crate) fn event_from_row(row: EventRow) -> StoreResult<StoredEvent> {
    let (id, kind, created, livemode, customer_id, state, attempts, last_error, received_at) = row;
    Ok(StoredEvent {
        state: EventState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("event state {state:?}")))?,
        id,
        kind,
        created,
        livemode,
        customer_id,
        attempts,
        last_error,
        received_at: time(received_at)?,
    })
}

/// A queued event as the applier takes it: `{event_columns}` first, as [`event_from_row`]
/// reads them, then its payload (column 9) and when it is due (column 10).
pub(crate) fn event_to_apply(row: &<Db as sqlx::Database>::Row) -> StoreResult<EventToApply> {
    use sqlx::Row as _;
    let head: EventRow = sqlx::FromRow::from_row(row)?;
    let next: Option<Time> = row.try_get(10)?;
    Ok(EventToApply {
        event: event_from_row(head)?,
        payload: row.try_get(9)?,
        next_attempt_at: next.map(time).transpose()?,
    })
}
