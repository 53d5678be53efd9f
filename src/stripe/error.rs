use std::fmt;

/// An error answer from Stripe's API, with everything needed to act on it and to find the
/// request in Stripe's dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// Stripe's `error.type` (`invalid_request_error`, `api_error`, `card_error`, …).
    pub kind: String,
    pub code: Option<String>,
    pub message: String,
    pub request_id: Option<String>,
    /// The server's `Retry-After`, for callers that schedule their own retries.
    pub retry_after: Option<std::time::Duration>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {} {}", self.status, self.kind)?;
        if let Some(code) = &self.code {
            write!(f, " ({code})")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(id) = &self.request_id {
            write!(f, " [request {id}]")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// Stripe answered with an error (after any retries it allowed).
    #[error("stripe api error: {0}")]
    Api(ApiError),
    /// No answer: connection refused or reset, or the attempt timed out (after retries).
    #[error("stripe unreachable ({}): {message}", if *.timed_out { "timeout" } else { "connection" })]
    Transport { timed_out: bool, message: String },
    /// Stripe answered 2xx with a body billsync cannot read.
    #[error("unexpected stripe response: {0}")]
    Decode(String),
    /// Not sent: billsync's own request budget (`BILLSYNC_STRIPE_BUDGET_RPS`) had no permit
    /// for it within the Stripe timeout.
    #[error("not sent: no Stripe request budget left within the timeout")]
    BudgetExhausted,
}

impl StripeError {
    /// Stripe is down, overloaded or rate limiting: the caller should try again later, and
    /// nothing was decided.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::BudgetExhausted => true,
            Self::Api(e) => e.status == 429 || e.status == 409 || e.status >= 500,
            Self::Decode(_) => false,
        }
    }

    /// The outcome label of a failed attempt in the metrics.
    pub fn metric_outcome(&self) -> &'static str {
        match self {
            Self::Transport {
                timed_out: true, ..
            } => "timeout",
            Self::Transport { .. } => "network_error",
            Self::Api(e) if e.status == 429 => "rate_limited",
            Self::Api(e) if e.status >= 500 => "server_error",
            Self::Api(_) => "client_error",
            Self::Decode(_) => "decode_error",
            Self::BudgetExhausted => "budget_exhausted",
        }
    }

    /// How long Stripe asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::Api(e) => e.retry_after,
            _ => None,
        }
    }

    /// The object does not exist (or, on localstripe, was deleted).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Api(e) if e.status == 404 || e.code.as_deref() == Some("resource_missing"))
    }
}
