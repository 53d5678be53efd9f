//! A claimed job's session advisory lock: its holder's session is alive while the job runs,
//! so another instance takes over a job whose holder died at once, lease or not.

use super::{
    common::{jobs::JobClaim, rows::job_from_row},
    LockSession, PgStore,
};
use crate::{
    domain::OutboxJob,
    store::{is_unique_violation, StoreResult},
};

/// The first key of a job's session advisory lock (`pg_advisory_lock(int4, int4)`; the second
/// is the job id mod 2^31-1).
const JOB_LOCK_SPACE: i32 = 0x6F62_7831; // "obx1"

impl PgStore {
    /// A pending job waits while any job of its user is in flight (the unique index on
    /// in-flight rows makes it atomic across instances), and only the user's first due job
    /// is taken. An in-flight job is taken over when its lease ran out or its holder's
    /// session (and so its lock) is gone. `$1` the limit, `$2` the lease.
    pub(super) const CLAIM_DUE_JOBS: &'static str = "WITH due AS (
            SELECT o.id FROM outbox o
            WHERE (o.state = 'in_flight' AND (o.locked_until < now() OR NOT EXISTS (
                       SELECT 1 FROM pg_locks l
                       WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                         AND l.database = (SELECT d.oid FROM pg_database d
                                           WHERE d.datname = current_database())
                         AND l.classid::bigint = 1868724273
                         AND l.objid::bigint = o.id % 2147483647)))
               OR (o.state = 'pending' AND o.next_attempt_at <= now()
                   AND NOT EXISTS (SELECT 1 FROM outbox b
                                   WHERE b.user_id = o.user_id AND b.state = 'in_flight')
                   AND NOT EXISTS (SELECT 1 FROM outbox b
                                   WHERE b.user_id = o.user_id AND b.state = 'pending'
                                     AND b.next_attempt_at <= now()
                                     AND (b.next_attempt_at, b.id) < (o.next_attempt_at, o.id)))
            ORDER BY o.next_attempt_at, o.id
            LIMIT $1
            FOR UPDATE SKIP LOCKED
         )
         UPDATE outbox SET state = 'in_flight', attempts = outbox.attempts + 1,
                claim_token = {new_token}, locked_until = {later $2}, updated_at = now()
         FROM due WHERE outbox.id = due.id
         RETURNING outbox.id, outbox.kind, outbox.user_id, outbox.payload, outbox.state,
                   outbox.attempts, outbox.last_error, outbox.claim_token,
                   outbox.next_attempt_at, outbox.created_at, outbox.updated_at";

    /// Runs a claiming statement on a connection of its own and, in the same transaction,
    /// takes each claimed job's session advisory lock there: the lock stays held until the
    /// job is finished, or until this process dies and Postgres frees it, so another
    /// instance takes the job over at once. A claim that a concurrent claimer's in-flight
    /// job of the same user refuses (the unique index) claims nothing.
    pub(super) async fn claim(&self, claim: JobClaim<'_>) -> StoreResult<Vec<OutboxJob>> {
        let mut connection = self.job_lock_pool.acquire().await?;
        let claimed = async {
            sqlx::query("BEGIN").execute(&mut *connection).await?;
            claim.fetch_all(&mut *connection).await
        }
        .await;
        let rows = match claimed {
            Ok(rows) if rows.is_empty() => {
                sqlx::query("COMMIT").execute(&mut *connection).await?;
                return Ok(Vec::new());
            }
            Ok(rows) => rows,
            Err(err) => {
                // Closing the connection ends its transaction; it holds no lock yet.
                drop(connection.detach());
                return if is_unique_violation(&err) {
                    Ok(Vec::new())
                } else {
                    Err(err.into())
                };
            }
        };
        let jobs = match rows
            .into_iter()
            .map(job_from_row)
            .collect::<StoreResult<Vec<_>>>()
        {
            Ok(jobs) => jobs,
            Err(err) => {
                drop(connection.detach());
                return Err(err);
            }
        };
        // A stale claim of this process on a re-claimed job lets go of its lock first.
        for job in &jobs {
            let stale = self
                .job_locks
                .lock()
                .expect("job lock map poisoned")
                .get(&job.id)
                .map(|(token, _)| token.clone());
            if let Some(token) = stale {
                self.claim_ended(job.id, &token).await;
            }
        }
        let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
        let locked: Result<Vec<i64>, sqlx::Error> = async {
            let locked = sqlx::query_scalar(
                "SELECT id FROM unnest($1::bigint[]) AS id
                 WHERE pg_try_advisory_lock($2, (id % 2147483647)::int4)",
            )
            .bind(&ids)
            .bind(JOB_LOCK_SPACE)
            .fetch_all(&mut *connection)
            .await?;
            sqlx::query("COMMIT").execute(&mut *connection).await?;
            Ok(locked)
        }
        .await;
        let locked = match locked {
            Ok(locked) => locked,
            Err(err) => {
                // Session locks outlive a rolled-back transaction: closing the connection
                // frees them.
                drop(connection.detach());
                return Err(err.into());
            }
        };
        if !locked.is_empty() {
            let session = LockSession::shared(connection, locked.len());
            let mut table = self.job_locks.lock().expect("job lock map poisoned");
            for job in jobs.iter().filter(|j| locked.contains(&j.id)) {
                let token = job.claim_token.clone().unwrap_or_default();
                table.insert(job.id, (token, session.clone()));
            }
        }
        Ok(jobs)
    }

    /// Lets go of a claimed job's lock, if this process holds it for that claim.
    pub(super) async fn claim_ended(&self, id: i64, token: &str) {
        let session = {
            let mut table = self.job_locks.lock().expect("job lock map poisoned");
            if table.get(&id).is_none_or(|(held, _)| held != token) {
                return;
            }
            table.remove(&id).map(|(_, session)| session)
        };
        let Some(session) = session else { return };
        let unlock = sqlx::query("SELECT pg_advisory_unlock($1, ($2 % 2147483647)::int4)")
            .bind(JOB_LOCK_SPACE)
            .bind(id);
        let unlocked = session.lock().await.unlock(unlock, 1).await;
        if let Err(err) = unlocked {
            tracing::warn!(error = %err, job_id = id, "cannot release a job lock; closed its session");
        }
    }
}
