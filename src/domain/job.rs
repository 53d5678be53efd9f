//! Durable jobs towards Stripe (the outbox), and the erasure's audit trail.

use std::time::Duration;

use time::OffsetDateTime;

/// A durable job towards Stripe.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Push the user's current email, name and phone to their customer.
    PushProfile,
    /// The erasure saga (payload: its progress).
    Erase,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PushProfile => "push_profile",
            Self::Erase => "erase",
        }
    }
    pub fn parse(raw: &str) -> Option<Self> {
        [Self::PushProfile, Self::Erase]
            .into_iter()
            .find(|k| k.as_str() == raw)
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    InFlight,
    Done,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InFlight => "in_flight",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Pending, Self::InFlight, Self::Done, Self::Failed]
            .into_iter()
            .find(|k| k.as_str() == raw)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxJob {
    pub id: i64,
    pub kind: JobKind,
    /// The user's id; replaced by `erased:<hash>` once an erasure completes.
    pub user_id: String,
    pub payload: serde_json::Value,
    pub state: JobState,
    /// Attempts started, this one included for a claimed job.
    pub attempts: i32,
    /// A fresh random token per claim: the claim's writes (`finish_job`, `save_job_payload`)
    /// only take effect while the row still carries it, and the push's idempotency key is
    /// made from it, so no key is ever sent twice with different parameters.
    pub claim_token: Option<String>,
    pub next_attempt_at: OffsetDateTime,
    pub last_error: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// What `erase_user` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Erased {
    /// The rows are gone; whether the user existed.
    Done(bool),
    /// Nothing deleted: the user is linked to this customer, which the saga has not handled.
    Relinked(String),
}

/// How a claimed job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    Done,
    /// Try again after `delay`; a newer pending job of the same kind for the user supersedes it.
    Retry {
        delay: Duration,
        error: String,
    },
    /// Parked for an operator.
    Failed {
        error: String,
    },
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub at: OffsetDateTime,
    pub actor: String,
    pub action: String,
    pub detail: serde_json::Value,
}

/// A parked job's error as a stable code for `sync.failed` (its text stays in the outbox,
/// for operators): what the retry policy's messages say the failure was.
pub fn failure_code(error: &str) -> &'static str {
    if error.starts_with("stripe api error") {
        "stripe_rejected"
    } else if error.starts_with("stripe unreachable") || error.starts_with("not sent") {
        "stripe_unavailable"
    } else if error.starts_with("database") {
        "database_unavailable"
    } else {
        "failed"
    }
}

#[cfg(test)]
mod failure_code_tests {
    use super::failure_code;

    #[test]
    fn errors_map_to_stable_codes() {
        for (error, code) in [
            (
                "stripe api error: 400 invalid_request_error: No such customer",
                "stripe_rejected",
            ),
            (
                "stripe unreachable (timeout): operation timed out",
                "stripe_unavailable",
            ),
            (
                "not sent: no Stripe request budget left within the timeout",
                "stripe_unavailable",
            ),
            (
                "database unavailable: pool timed out",
                "database_unavailable",
            ),
            ("no handler registered for erase jobs", "failed"),
        ] {
            assert_eq!(failure_code(error), code, "{error}");
        }
    }
}
