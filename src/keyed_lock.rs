//! In-process mutual exclusion per key: concurrent requests for one user queue here instead of
//! each holding a database connection while they wait for the cross-instance claim.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default, Clone)]
pub struct KeyedLock {
    entries: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
}

pub struct KeyedGuard {
    entries: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLock {
    pub async fn lock(&self, key: &str) -> KeyedGuard {
        let mutex = {
            let mut entries = self.entries.lock().expect("keyed lock map poisoned");
            entries.entry(key.to_owned()).or_default().clone()
        };
        KeyedGuard {
            entries: self.entries.clone(),
            key: key.to_owned(),
            guard: Some(mutex.lock_owned().await),
        }
    }

    /// Keys with a holder or a waiter; idle keys are removed so the map does not grow.
    pub fn active_keys(&self) -> usize {
        self.entries.lock().expect("keyed lock map poisoned").len()
    }
}

impl Drop for KeyedGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut entries = self.entries.lock().expect("keyed lock map poisoned");
        // Only the map holds it now: nobody waits, so the entry can go. Clones are made under
        // this same map lock, so the count cannot change while we look.
        if entries
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            entries.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_holder_per_key_and_idle_keys_are_dropped() {
        let lock = KeyedLock::default();
        let inside = Arc::new(AtomicUsize::new(0));
        let max_inside = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (lock, inside, max_inside) = (lock.clone(), inside.clone(), max_inside.clone());
                tokio::spawn(async move {
                    let _guard = lock.lock("user-1").await;
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max_inside.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(max_inside.load(Ordering::SeqCst), 1);
        assert_eq!(lock.active_keys(), 0);

        // Different keys do not wait for each other.
        let _a = lock.lock("a").await;
        let b = tokio::time::timeout(Duration::from_secs(1), lock.lock("b")).await;
        assert!(b.is_ok());
    }
}
