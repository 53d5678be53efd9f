//! A read-through cache of customer links for the Postgres store, so the resolve hit path
//! (the hottest route) costs no database round trip.
//!
//! Coherence: every change or removal of a link fires `NOTIFY billsync_link_changes` from a
//! trigger (whatever made it: billsync, a cascade, an operator's SQL). Each instance listens
//! and evicts. The cache only serves while its listener is connected; on a lost connection it
//! empties itself and stays off until listening again. A fill that raced with an eviction is
//! dropped (generation check), and entries expire after a TTL as a last safety net.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        RwLock,
    },
    time::{Duration, Instant},
};

use super::CustomerLink;

pub const CHANNEL: &str = "billsync_link_changes";

pub struct LinkCache {
    entries: RwLock<HashMap<String, (CustomerLink, Instant)>>,
    /// Bumped by every eviction; a fill started before one is not stored.
    generation: AtomicU64,
    enabled: AtomicBool,
    ttl: Duration,
    capacity: usize,
}

impl LinkCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            entries: RwLock::default(),
            generation: AtomicU64::new(0),
            enabled: AtomicBool::new(false),
            ttl,
            capacity,
        }
    }

    /// The generation to pass to [`Self::fill`] for a read that starts now.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn get(&self, user_id: &str) -> Option<CustomerLink> {
        if !self.enabled.load(Ordering::Acquire) {
            return None;
        }
        let entries = self.entries.read().expect("link cache poisoned");
        entries
            .get(user_id)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(link, _)| link.clone())
    }

    /// Stores a link read from the database at `generation`, unless something was evicted
    /// since (the read may be stale).
    pub fn fill(&self, link: &CustomerLink, generation: u64) {
        if !self.enabled.load(Ordering::Acquire) || self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.write().expect("link cache poisoned");
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if entries.len() >= self.capacity {
            // Rare and cheap to recover from: the next reads refill what is hot.
            entries.clear();
        }
        entries.insert(link.user_id.to_string(), (link.clone(), Instant::now()));
    }

    pub fn evict(&self, user_id: &str) {
        let mut entries = self.entries.write().expect("link cache poisoned");
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.remove(user_id);
    }

    /// Turns the cache on (listener connected) or off and empty (listener lost).
    pub fn set_listening(&self, listening: bool) {
        let mut entries = self.entries.write().expect("link cache poisoned");
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.clear();
        self.enabled.store(listening, Ordering::Release);
    }

    pub fn len(&self) -> usize {
        self.entries.read().expect("link cache poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{LinkSource, StripeCustomerId, UserId};

    fn link(user: &str) -> CustomerLink {
        CustomerLink {
            user_id: UserId::parse(user).unwrap(),
            customer_id: StripeCustomerId::parse("cus_1").unwrap(),
            livemode: false,
            linked_via: LinkSource::Created,
            linked_at: time::macros::datetime!(2026-01-01 00:00 UTC),
        }
    }

    #[test]
    fn serves_only_while_listening() {
        let cache = LinkCache::new(Duration::from_secs(60), 10);
        cache.fill(&link("u"), cache.generation());
        assert_eq!(cache.get("u"), None, "off until the listener is up");
        cache.set_listening(true);
        cache.fill(&link("u"), cache.generation());
        assert_eq!(cache.get("u"), Some(link("u")));
        cache.set_listening(false);
        assert_eq!(cache.get("u"), None);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_fill_that_raced_an_eviction_is_dropped() {
        let cache = LinkCache::new(Duration::from_secs(60), 10);
        cache.set_listening(true);
        let before_read = cache.generation();
        cache.evict("u"); // the link changed while we were reading it
        cache.fill(&link("u"), before_read);
        assert_eq!(cache.get("u"), None);
    }

    #[test]
    fn entries_expire_and_capacity_is_bounded() {
        let cache = LinkCache::new(Duration::from_millis(20), 3);
        cache.set_listening(true);
        for user in ["a", "b", "c", "d"] {
            cache.fill(&link(user), cache.generation());
        }
        assert!(cache.len() <= 3);
        assert_eq!(cache.get("d"), Some(link("d")));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(cache.get("d"), None);
    }
}
