//! Stripe events in the inbox, and what applying them reads and writes.

use std::time::Duration;

use time::OffsetDateTime;

use super::{PushedProfile, RemoteProfile, User};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum EventState {
    Pending,
    Applied,
    Skipped,
    Failed,
}

impl EventState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Applied => "applied",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
        }
    }
    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Pending, Self::Applied, Self::Skipped, Self::Failed]
            .into_iter()
            .find(|k| k.as_str() == raw)
    }
}

/// A verified Stripe event, as it is written to the inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub id: String,
    pub kind: String,
    /// Stripe's `created`, unix seconds.
    pub created: i64,
    pub livemode: bool,
    pub customer_id: Option<String>,
    /// The raw, verified body.
    pub payload: String,
    /// `Pending` for events billsync applies, `Skipped` for the rest.
    pub state: EventState,
}

/// An inbox entry, without its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub id: String,
    pub kind: String,
    pub created: i64,
    pub livemode: bool,
    pub customer_id: Option<String>,
    pub state: EventState,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub received_at: OffsetDateTime,
}

/// An inbox event ready to apply: its envelope and its raw payload.
#[derive(Debug, Clone, PartialEq)]
pub struct EventToApply {
    pub event: StoredEvent,
    /// `None` for a `customer.updated` followed by another due one: only the newest snapshot
    /// of such a run is applied, so the older payloads are not loaded.
    pub payload: Option<String>,
    /// When a failed event may be tried again; `None` for a pending one.
    pub next_attempt_at: Option<OffsetDateTime>,
}

/// How applying an event ended.
#[derive(Debug, Clone, PartialEq)]
pub enum EventOutcome {
    Applied,
    /// Try again after `delay`.
    Retry {
        delay: Duration,
        error: String,
    },
    /// Parked for an operator (replay it through `/v1/events/{id}/replay`).
    Failed {
        error: String,
    },
}

/// What applying a customer's newest `customer.updated` snapshot needs to know about the
/// user linked to it; read for many customers at once.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateContext {
    pub customer_id: String,
    pub user: User,
    /// The `created` and event id of the newest snapshot applied.
    pub watermark: Option<(i64, Option<String>)>,
    /// A profile push is pending or in flight: local values win.
    pub active_push: bool,
    pub last_push: Option<PushedProfile>,
    /// The profile version the newest recorded push stamped into the customer's metadata;
    /// `None` if no push carried a stamp yet.
    pub pushed_stamp: Option<i64>,
}

/// One customer's share of a batch of applied `customer.updated` events.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerUpdate {
    pub customer_id: String,
    pub profile: Option<RemoteProfile>,
    /// Raise the link's watermark to this snapshot (`created`, event id).
    pub watermark: Option<(i64, String)>,
    /// The events this finishes, as applied.
    pub events: Vec<String>,
}
