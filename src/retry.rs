//! The retry policy every background job shares (the outbox's jobs, the erasure saga, the
//! webhook applier's events): how a failed attempt is classified (`JobFailure`), how long to
//! wait before the next one (exponential backoff with jitter, never under the server's
//! `Retry-After`), and when to give up. A leaf: it decides, and its callers record the
//! outcome in their own tables.

use std::time::Duration;

use crate::{config::OutboxConfig, store::StoreError, stripe::StripeError};

/// Why a job attempt did not finish.
#[derive(Debug)]
pub enum JobFailure {
    /// Worth retrying: Stripe or the database is unavailable.
    Transient {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Retrying will not help (Stripe refused the request): parked for an operator.
    Permanent(String),
}

impl From<StripeError> for JobFailure {
    fn from(err: StripeError) -> Self {
        if err.is_unavailable() {
            Self::Transient {
                retry_after: err.retry_after(),
                error: err.to_string(),
            }
        } else {
            Self::Permanent(err.to_string())
        }
    }
}

impl From<StoreError> for JobFailure {
    fn from(err: StoreError) -> Self {
        Self::Transient {
            error: err.to_string(),
            retry_after: None,
        }
    }
}

/// How many attempts a job gets, and the waits between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl From<&OutboxConfig> for RetryPolicy {
    fn from(config: &OutboxConfig) -> Self {
        Self {
            max_attempts: config.max_attempts,
            backoff_base: config.backoff_base,
            backoff_max: config.backoff_max,
        }
    }
}

/// What a failed attempt comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Try again after `delay`.
    Retry { delay: Duration, error: String },
    /// Worth retrying, but that was the last attempt.
    Exhausted { error: String },
    /// Not worth retrying.
    Permanent { error: String },
}

impl RetryPolicy {
    /// `attempt` counts from 1: the attempt that just failed.
    pub fn decide(&self, attempt: u32, failure: JobFailure) -> Decision {
        match failure {
            JobFailure::Transient { error, retry_after } if attempt < self.max_attempts => {
                Decision::Retry {
                    delay: self.backoff(attempt, retry_after),
                    error,
                }
            }
            JobFailure::Transient { error, .. } => Decision::Exhausted { error },
            JobFailure::Permanent(error) => Decision::Permanent { error },
        }
    }

    /// `base * 2^(attempt-1)`, capped, with jitter over its upper half; never shorter than
    /// the server's `Retry-After`.
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exponential = self
            .backoff_base
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.backoff_max);
        exponential
            .mul_f64(0.5 + fastrand::f64() * 0.5)
            .max(retry_after.unwrap_or_default())
    }
}

#[cfg(test)]
impl RetryPolicy {
    /// Three attempts, waits of one second doubling up to a minute: a policy for tests.
    pub(crate) fn three_attempts() -> Self {
        Self {
            max_attempts: 3,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_policy() -> RetryPolicy {
        RetryPolicy::from(
            &crate::config::Config::load(&Default::default())
                .unwrap()
                .outbox,
        )
    }

    #[test]
    fn backoff_doubles_is_capped_and_honours_retry_after() {
        let policy = default_policy();
        let mut previous_ceiling = Duration::ZERO;
        for attempt in 1..=12 {
            let ceiling = policy
                .backoff_base
                .saturating_mul(2u32.pow(attempt - 1))
                .min(policy.backoff_max);
            let delay = policy.backoff(attempt, None);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "attempt {attempt}: {delay:?}"
            );
            assert!(ceiling >= previous_ceiling);
            previous_ceiling = ceiling;
        }
        assert_eq!(previous_ceiling, policy.backoff_max);
        assert!(policy.backoff(1, Some(Duration::from_secs(30))) >= Duration::from_secs(30));
    }

    #[test]
    fn decide_retries_transient_failures_until_the_last_attempt() {
        let policy = RetryPolicy::three_attempts();
        let transient = || JobFailure::Transient {
            error: "unavailable".into(),
            retry_after: None,
        };
        let permanent = || JobFailure::Permanent("refused".into());
        let exhausted = || Decision::Exhausted {
            error: "unavailable".into(),
        };
        let refused = || Decision::Permanent {
            error: "refused".into(),
        };
        // (failed attempt, failure, the decision; `None`: retried after the backoff)
        type Case = (u32, fn() -> JobFailure, Option<Decision>);
        let cases: [Case; 6] = [
            (1, transient, None),
            (2, transient, None),
            (3, transient, Some(exhausted())),
            (4, transient, Some(exhausted())),
            (1, permanent, Some(refused())),
            (3, permanent, Some(refused())),
        ];
        for (attempt, failure, expected) in cases {
            match (policy.decide(attempt, failure()), expected) {
                (Decision::Retry { delay, error }, None) => {
                    assert_eq!(error, "unavailable");
                    let ceiling = Duration::from_secs(1 << (attempt - 1));
                    assert!(delay <= ceiling && delay >= ceiling / 2, "{delay:?}");
                }
                (decision, expected) => {
                    assert_eq!(Some(decision), expected, "attempt {attempt}")
                }
            }
        }
        // A server's Retry-After outlasts the backoff.
        let decision = policy.decide(
            1,
            JobFailure::Transient {
                error: "slow down".into(),
                retry_after: Some(Duration::from_secs(120)),
            },
        );
        assert!(
            matches!(decision, Decision::Retry { delay, .. } if delay >= Duration::from_secs(120)),
            "{decision:?}"
        );
    }
}
