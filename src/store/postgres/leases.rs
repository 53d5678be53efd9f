//! Customers' leases as session advisory locks on a connection held until release: if this
//! process dies, the connection closes and Postgres frees the locks at once, so another
//! instance carries on without waiting for a lease to run out. One connection holds a batch.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{LockSession, PgStore, SharedLockSession};
use crate::store::{traits::Leases, StoreResult};

#[async_trait]
impl Leases for PgStore {
    /// Instances share the work, and locks die with their connection: nothing to claim.
    async fn claim_serving(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn try_lease_customers(
        &self,
        customers: &[String],
        holder: &str,
        _lease: Duration,
    ) -> StoreResult<Vec<String>> {
        let mut wanted = customers.to_vec();
        wanted.sort_unstable();
        wanted.dedup(); // a session takes an advisory lock twice: it would stay held once
        let mut connection = self.lock_pool.acquire().await?;
        let locked: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(
            "SELECT c FROM unnest($1::text[]) AS c
             WHERE pg_try_advisory_lock(hashtextextended(c, 42))",
        )
        .bind(&wanted)
        .fetch_all(&mut *connection)
        .await;
        let locked = match locked {
            Ok(locked) => locked,
            Err(err) => {
                // Some locks may be held: closing the connection frees them.
                drop(connection.detach());
                return Err(err.into());
            }
        };
        if !locked.is_empty() {
            let session = LockSession::shared(connection, locked.len());
            let mut table = self
                .customer_locks
                .lock()
                .expect("customer lock map poisoned");
            for customer in &locked {
                table.insert(customer.clone(), (holder.to_owned(), session.clone()));
            }
        }
        Ok(locked)
    }

    async fn release_customers(&self, customers: &[String], holder: &str) -> StoreResult<()> {
        // Group by the connection holding each lock.
        let mut sessions: Vec<(SharedLockSession, Vec<String>)> = Vec::new();
        {
            let mut table = self
                .customer_locks
                .lock()
                .expect("customer lock map poisoned");
            for customer in customers {
                // Another holder's lease stays.
                if table.get(customer).is_none_or(|(owner, _)| owner != holder) {
                    continue;
                }
                let Some((_, session)) = table.remove(customer) else {
                    continue;
                };
                match sessions.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &session)) {
                    Some((_, held)) => held.push(customer.clone()),
                    None => sessions.push((session, vec![customer.clone()])),
                }
            }
        }
        let mut first_error = None;
        for (session, released) in sessions {
            let unlock = sqlx::query(
                "SELECT pg_advisory_unlock(hashtextextended(c, 42)) FROM unnest($1::text[]) AS c",
            )
            .bind(&released);
            let unlocked = session.lock().await.unlock(unlock, released.len()).await;
            if let Err(err) = unlocked {
                first_error.get_or_insert(err);
            }
        }
        match first_error {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }
}
