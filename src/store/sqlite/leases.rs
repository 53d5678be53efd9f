//! One serving process per file, holding `<file>.lock`; customers' leases are rows with an
//! expiry (`event_customer_leases`).

use std::{path::PathBuf, time::Duration};

use async_trait::async_trait;

use super::{
    dialect::{ids, span, sql, Clock, Clocked},
    SqliteStore,
};
use crate::store::{traits::Leases, StoreError, StoreResult};

/// The lock file beside the database that a serving process holds.
fn serve_lock_path(file: &std::path::Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

#[async_trait]
impl Leases for SqliteStore {
    async fn claim_serving(&self) -> StoreResult<()> {
        if let Some(file) = &self.file {
            let path = serve_lock_path(file);
            let lock = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?
            };
            match lock.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::InUse(format!(
                        "another billsync process is serving {} (it holds {}); \
                         SQLite takes one serving process per file: use Postgres for several",
                        file.display(),
                        path.display()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(StoreError::Unavailable(sqlx::Error::Io(e)))
                }
            }
            *self.serving.lock().expect("serving lock mutex") = Some(lock);
        }
        // The only serving process: leases left by one that died are void.
        sqlx::query("DELETE FROM event_customer_leases")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn try_lease_customers(
        &self,
        customers: &[String],
        holder: &str,
        lease: Duration,
    ) -> StoreResult<Vec<String>> {
        // `WHERE true` lets SQLite parse the upsert clause after a SELECT.
        Ok(sqlx::query_scalar(&sql(
            "INSERT INTO event_customer_leases (stripe_customer_id, holder, lease_until)
             SELECT DISTINCT value, $2, {later $3} FROM json_each($1) WHERE true
             ON CONFLICT (stripe_customer_id) DO UPDATE
                SET holder = excluded.holder, lease_until = excluded.lease_until
                WHERE event_customer_leases.lease_until <= {now}
             RETURNING stripe_customer_id",
        ))
        .bind(ids(customers))
        .bind(holder)
        .bind(span(lease))
        .clock(Clock::now())
        .fetch_all(&self.pool)
        .await?)
    }

    async fn release_customers(&self, customers: &[String], holder: &str) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM event_customer_leases
             WHERE stripe_customer_id IN (SELECT value FROM json_each($1)) AND holder = $2",
        )
        .bind(ids(customers))
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
