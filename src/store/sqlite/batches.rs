//! Batches as a statement per row, in one transaction: in-process, a round trip is cheap.

use std::collections::HashSet;

use super::{
    common::{
        links::{raise_watermark, record_pushed},
        rows::event_to_apply,
        users::{erased_among, get_user_in, update_user_in, upsert_user_in},
    },
    dialect::{begin_write, ids, sql, Clock, Clocked},
    SqliteStore,
};
use crate::{
    domain::{
        ChangeOrigin, CustomerUpdate, EventState, EventToApply, ImportOutcome, NewEvent, UserImport,
    },
    store::{first_inserted, StoreResult},
};

impl SqliteStore {
    /// Finishes applied events: deletes their queue rows; the event row is rewritten only for an
    /// event that failed before, to keep its attempt count.
    pub(super) async fn finish_applied(
        db: &mut sqlx::SqliteConnection,
        events: &[String],
        now: Clock,
    ) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        sqlx::query(&sql("UPDATE stripe_events
             SET state = 'applied', last_error = NULL, applied_at = {now},
                 attempts = (SELECT q.attempts FROM stripe_event_queue q
                             WHERE q.event_id = stripe_events.id)
             WHERE id IN (SELECT event_id FROM stripe_event_queue
                          WHERE event_id {in $1} AND attempts > 0)"))
        .bind(ids(events))
        .clock(now)
        .execute(&mut *db)
        .await?;
        sqlx::query(&sql(
            "DELETE FROM stripe_event_queue WHERE event_id {in $1}",
        ))
        .bind(ids(events))
        .execute(db)
        .await?;
        Ok(())
    }

    pub(super) async fn store_events(&self, events: &[NewEvent]) -> StoreResult<Vec<bool>> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        let mut inserted = HashSet::new();
        for event in events {
            let seq: Option<i64> = sqlx::query_scalar(&sql(
                "INSERT INTO stripe_events (id, type, created, livemode, stripe_customer_id,
                                            payload, received_at, state)
                 VALUES ($1, $2, $3, $4, $5, $6, {now}, $7)
                 ON CONFLICT (id) DO NOTHING
                 RETURNING seq",
            ))
            .bind(&event.id)
            .bind(&event.kind)
            .bind(event.created)
            .bind(event.livemode)
            .bind(&event.customer_id)
            .bind(&event.payload)
            .bind(event.state.as_str())
            .clock(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(seq) = seq else { continue };
            if event.state == EventState::Pending {
                sqlx::query(&sql(
                    "INSERT INTO stripe_event_queue (event_id, stripe_customer_id, created, seq,
                                                     received_at)
                     VALUES ($1, $2, $3, $4, {now})",
                ))
                .bind(&event.id)
                .bind(&event.customer_id)
                .bind(event.created)
                .bind(seq)
                .clock(now)
                .execute(&mut *tx)
                .await?;
            }
            inserted.insert(event.id.clone());
        }
        tx.commit().await?;
        Ok(first_inserted(events, &inserted))
    }

    pub(super) async fn queued_events(
        &self,
        customers: &[String],
        limit: u32,
    ) -> StoreResult<Vec<(String, Vec<EventToApply>)>> {
        let now = Clock::now();
        let mut connection = self.pool.acquire().await?;
        let mut found = Vec::new();
        for customer in customers {
            // A `customer.updated` followed by another due one is superseded by it: its
            // payload stays in the database.
            let rows = sqlx::query(&sql(
                "SELECT id, type, created, livemode, stripe_customer_id, state, attempts,
                        last_error, received_at,
                        CASE WHEN type = 'customer.updated' AND next_supersedes THEN NULL
                             ELSE payload END,
                        next_attempt_at
                 FROM (SELECT w.*, coalesce(lead(w.type = 'customer.updated' AND w.due)
                                            OVER (ORDER BY w.created, w.seq), 0)
                                   AS next_supersedes
                       FROM (SELECT e.id, e.type, q.created, q.seq, e.livemode,
                                    e.stripe_customer_id, q.state, q.attempts, q.last_error,
                                    e.received_at, e.payload, q.next_attempt_at,
                                    (q.next_attempt_at IS NULL OR q.next_attempt_at <= {now})
                                        AS due
                             FROM stripe_event_queue q JOIN stripe_events e ON e.id = q.event_id
                             WHERE q.stripe_customer_id = $1
                               AND (q.state = 'pending' OR q.next_attempt_at IS NOT NULL)
                             ORDER BY q.created, q.seq
                             LIMIT $2) AS w)
                 ORDER BY created, seq",
            ))
            .bind(customer)
            .bind(i64::from(limit))
            .clock(now)
            .fetch_all(&mut *connection)
            .await?;
            if rows.is_empty() {
                continue;
            }
            let events = rows
                .iter()
                .map(event_to_apply)
                .collect::<StoreResult<Vec<_>>>()?;
            found.push((customer.clone(), events));
        }
        Ok(found)
    }

    /// `Users::import_users`: each user as `upsert_user` writes them, in one transaction.
    pub(super) async fn import_batch(
        &self,
        users: &[UserImport],
    ) -> StoreResult<Vec<ImportOutcome>> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        let subjects = users.iter().map(|u| u.subject.clone()).collect::<Vec<_>>();
        let erased = erased_among(&mut tx, &subjects).await?;
        let mut outcomes = Vec::with_capacity(users.len());
        for import in users {
            if erased.contains(&import.subject)
                && get_user_in(&mut tx, &import.user.id).await?.is_none()
            {
                outcomes.push(ImportOutcome::Erased);
                continue;
            }
            let (before, saved) = upsert_user_in(
                &mut tx,
                &import.user,
                ChangeOrigin::Admin,
                self.push_debounce,
                now,
            )
            .await?;
            outcomes.push(match before {
                None => ImportOutcome::Created(saved),
                Some(before) if before.version == saved.version => ImportOutcome::Unchanged(saved),
                Some(_) => ImportOutcome::Updated(saved),
            });
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    pub(super) async fn commit_updates(
        &self,
        updates: &[CustomerUpdate],
    ) -> StoreResult<Vec<String>> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        let mut conflicts = Vec::new();
        let mut finished = Vec::new();
        for update in updates {
            if let Some(profile) = &update.profile {
                let Some(saved) = update_user_in(
                    &mut tx,
                    &profile.user,
                    profile.expected,
                    ChangeOrigin::Stripe,
                    now,
                )
                .await?
                else {
                    conflicts.push(update.customer_id.clone());
                    continue;
                };
                let pushed = &profile.pushed;
                record_pushed(&mut tx, &profile.user.id, pushed, saved.version, None, now).await?;
            }
            if let Some((created, event_id)) = &update.watermark {
                raise_watermark(&mut tx, &update.customer_id, *created, event_id).await?;
            }
            finished.extend(update.events.iter().cloned());
        }
        Self::finish_applied(&mut tx, &finished, now).await?;
        tx.commit().await?;
        Ok(conflicts)
    }
}
