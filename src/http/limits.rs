//! Per-user limits of the user routes that call Stripe while the person waits (portal
//! sessions, data exports, account deletions): a token bucket per token `sub`, so one signed-in
//! user looping on a route cannot spend the account's Stripe rate limit.
//!
//! Each bucket is a GCRA cell (one instant per user: when their bucket is next full), kept in
//! this instance's memory: behind N instances without sticky routing a user gets up to N times
//! the quota, which still bounds them (see the README's limits section). The map cannot grow
//! without bound: an entry whose bucket is full again says nothing a missing entry does not,
//! so full entries are dropped when the map reaches its size; past that (a flood of distinct,
//! validly signed subs) new users are let through unrecorded rather than refused.
//!
//! Not the `governor` crate: its keyed store grows until `retain_recent` is called, runs on its
//! own clock rather than tokio's, and would bring several crates for what is a few lines here.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

use crate::{
    config::{Quota, UserLimitsConfig},
    error::ApiError,
};

/// Users tracked per route at most (about 100 bytes each).
const MAX_TRACKED: usize = 100_000;

/// One route's buckets.
pub struct KeyedLimiter {
    interval: Duration,
    /// How far ahead of now a user's bucket may be "next full" and still admit a request:
    /// `burst - 1` intervals.
    tolerance: Duration,
    max_tracked: usize,
    state: Mutex<Cells>,
}

struct Cells {
    /// When each user's bucket is full again (only users with a bucket not full now).
    full_at: HashMap<String, Instant>,
    /// Full entries are swept at most once a second, so a full map costs no sweep per request.
    next_sweep: Instant,
}

impl KeyedLimiter {
    pub fn new(quota: Quota) -> Self {
        Self::with_capacity(quota, MAX_TRACKED)
    }

    fn with_capacity(quota: Quota, max_tracked: usize) -> Self {
        Self {
            interval: quota.interval,
            tolerance: quota.interval * quota.burst.saturating_sub(1),
            max_tracked,
            state: Mutex::new(Cells {
                full_at: HashMap::new(),
                next_sweep: Instant::now(),
            }),
        }
    }

    /// Takes one token of `key`'s bucket at `now`, or says how long until one is there.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut cells = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let full_at = cells
            .full_at
            .get(key)
            .copied()
            .filter(|at| *at > now)
            .unwrap_or(now);
        let ahead = full_at - now;
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        let next = full_at + self.interval;
        if let Some(at) = cells.full_at.get_mut(key) {
            *at = next;
            return Ok(());
        }
        if cells.full_at.len() >= self.max_tracked && now >= cells.next_sweep {
            cells.full_at.retain(|_, at| *at > now);
            cells.next_sweep = now + Duration::from_secs(1);
        }
        if cells.full_at.len() < self.max_tracked {
            cells.full_at.insert(key.to_owned(), next);
        }
        Ok(())
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.state.lock().unwrap().full_at.len()
    }
}

/// The user routes that are limited, by the route template their metric carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    PortalSession,
    Export,
    DeleteAccount,
}

impl Limited {
    fn route(self) -> &'static str {
        match self {
            Self::PortalSession => "/api/billing/create-portal-session",
            Self::Export => "/api/user/export-data",
            Self::DeleteAccount => "/api/user/delete-account",
        }
    }
}

pub struct UserLimits {
    portal: KeyedLimiter,
    export: KeyedLimiter,
    delete: KeyedLimiter,
}

impl UserLimits {
    pub fn new(config: &UserLimitsConfig) -> Self {
        Self {
            portal: KeyedLimiter::new(config.portal),
            export: KeyedLimiter::new(config.export),
            delete: KeyedLimiter::new(config.delete),
        }
    }

    /// Charges the signed-in user (their verified `sub`) one request of `route`; called after
    /// authentication, so nobody can spend another user's quota or fill the map unsigned.
    pub fn charge(&self, route: Limited, user_id: &str) -> Result<(), ApiError> {
        let limiter = match route {
            Limited::PortalSession => &self.portal,
            Limited::Export => &self.export,
            Limited::DeleteAccount => &self.delete,
        };
        limiter.check(user_id, Instant::now()).map_err(|wait| {
            metrics::counter!("billsync_user_rate_limited_total", "route" => route.route())
                .increment(1);
            ApiError::RateLimited {
                retry_after_secs: whole_seconds(wait),
            }
        })
    }
}

/// A `Retry-After` in whole seconds: rounded up, at least 1.
fn whole_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(burst: u32, secs: u64) -> Quota {
        Quota {
            burst,
            interval: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_burst_then_one_per_interval_per_user() {
        let limiter = KeyedLimiter::new(quota(3, 10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check("alice", t0), Ok(()));
        }
        assert_eq!(limiter.check("alice", t0), Err(Duration::from_secs(10)));
        // Another user has a bucket of their own.
        assert_eq!(limiter.check("bob", t0), Ok(()));
        // A token comes back every interval, not the whole burst at once.
        let t4 = t0 + Duration::from_secs(4);
        assert_eq!(limiter.check("alice", t4), Err(Duration::from_secs(6)));
        let t10 = t0 + Duration::from_secs(10);
        assert_eq!(limiter.check("alice", t10), Ok(()));
        assert_eq!(limiter.check("alice", t10), Err(Duration::from_secs(10)));
        // Idle long enough, the bucket is full again: the burst, and no more.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert_eq!(limiter.check("alice", later), Ok(()));
        }
        assert!(limiter.check("alice", later).is_err());
    }

    #[test]
    fn a_refused_request_does_not_cost_a_token() {
        let limiter = KeyedLimiter::new(quota(1, 60));
        let t0 = Instant::now();
        assert!(limiter.check("u", t0).is_ok());
        for s in 1..30 {
            assert!(limiter.check("u", t0 + Duration::from_secs(s)).is_err());
        }
        assert!(limiter.check("u", t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn full_buckets_are_forgotten_so_the_map_stays_bounded() {
        let limiter = KeyedLimiter::with_capacity(quota(1, 10), 100);
        let t0 = Instant::now();
        for i in 0..100 {
            limiter.check(&format!("u{i}"), t0).unwrap();
        }
        assert_eq!(limiter.tracked(), 100);
        // Full: a new user is let through, not tracked, while every bucket is still in use...
        limiter.check("late", t0).unwrap();
        assert_eq!(limiter.tracked(), 100);
        assert!(
            limiter.check("u0", t0).is_err(),
            "tracked users stay limited"
        );
        // ...and once those buckets are full again, they make room.
        let t11 = t0 + Duration::from_secs(11);
        limiter.check("new", t11).unwrap();
        assert_eq!(limiter.tracked(), 1);
        assert!(limiter.check("new", t11).is_err());
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(12_001)), 13);
        assert_eq!(whole_seconds(Duration::from_secs(300)), 300);
    }
}
