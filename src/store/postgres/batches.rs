//! Batches in one statement each (UNNEST, LATERAL): one round trip however many rows.

use std::collections::HashMap;

use sqlx::{Row, Transaction};

use super::{
    common::{
        app_events::append,
        rows::{event_to_apply, user_from_row, UserRow},
        users::{enqueue_pushes, erased_among},
    },
    dialect::{erasure_gate, sql, Clock},
    PgStore,
};
use crate::{
    domain::{
        ChangeOrigin, CustomerUpdate, EventToApply, ImportOutcome, NewAppEvent, NewEvent,
        PushedProfile, RemoteProfile, User, UserImport, UserUpsert,
    },
    store::{first_inserted, opt_str, StoreError, StoreResult},
};

impl PgStore {
    /// Finishes applied events: deletes their queue rows; the event row is rewritten only for
    /// an event that failed before, to keep its attempt count. One statement, as it is run
    /// for every batch applied.
    pub(super) async fn finish_applied(
        db: &mut sqlx::PgConnection,
        events: &[String],
        _now: Clock,
    ) -> StoreResult<()> {
        if !events.is_empty() {
            sqlx::query(
                "WITH done AS (
                     DELETE FROM stripe_event_queue WHERE event_id = ANY($1)
                     RETURNING event_id, attempts)
                 UPDATE stripe_events e
                 SET state = 'applied', attempts = done.attempts, last_error = NULL,
                     applied_at = now()
                 FROM done WHERE e.id = done.event_id AND done.attempts > 0",
            )
            .bind(events)
            .execute(db)
            .await?;
        }
        Ok(())
    }

    pub(super) async fn store_events(&self, events: &[NewEvent]) -> StoreResult<Vec<bool>> {
        // Numbered in arrival order (UNNEST keeps it), then inserted in id order: two
        // writers' batches holding the same events (Stripe delivering one twice at once) then
        // lock them in one order and one waits for the other, where opposite orders
        // deadlocked. Events to apply also get their queue row, in the same statement.
        let inserted: Vec<String> = sqlx::query_scalar(
            "WITH arrived AS (
                 SELECT e.*, nextval('stripe_events_arrival_seq_seq') AS arrival_seq
                 FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::bool[], $5::text[],
                             $6::text[], $7::text[])
                      AS e(id, type, created, livemode, customer, payload, state)),
             fresh AS (
                 INSERT INTO stripe_events (id, type, created, livemode, stripe_customer_id,
                                            payload, received_at, state, arrival_seq)
                 SELECT id, type, created, livemode, customer, payload, now(), state, arrival_seq
                 FROM arrived ORDER BY id
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id, stripe_customer_id, created, arrival_seq, received_at, state),
             queued AS (
                 INSERT INTO stripe_event_queue (event_id, stripe_customer_id, created,
                                                 arrival_seq, received_at)
                 SELECT id, stripe_customer_id, created, arrival_seq, received_at FROM fresh
                 WHERE state = 'pending')
             SELECT id FROM fresh",
        )
        .bind(events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.created).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.livemode).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| e.customer_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.payload.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|e| e.state.as_str()).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        Ok(first_inserted(events, &inserted.into_iter().collect()))
    }

    pub(super) async fn queued_events(
        &self,
        customers: &[String],
        limit: u32,
    ) -> StoreResult<Vec<(String, Vec<EventToApply>)>> {
        // A `customer.updated` followed by another due one is superseded by it: its payload
        // stays in the database.
        let rows = sqlx::query(
            "SELECT x.id, x.type, x.created, x.livemode, x.stripe_customer_id, x.state,
                    x.attempts, x.last_error, x.received_at,
                    CASE WHEN x.type = 'customer.updated' AND x.next_supersedes THEN NULL
                         ELSE x.payload END,
                    x.next_attempt_at, c.customer
             FROM unnest($1::text[]) WITH ORDINALITY AS c(customer, ord)
             CROSS JOIN LATERAL (
                 SELECT w.*, coalesce(lead(w.type = 'customer.updated' AND w.due)
                                      OVER (ORDER BY w.created, w.arrival_seq), false)
                             AS next_supersedes
                 FROM (SELECT e.id, e.type, q.created, q.arrival_seq, e.livemode,
                              e.stripe_customer_id, q.state, q.attempts, q.last_error,
                              e.received_at, e.payload, q.next_attempt_at,
                              (q.next_attempt_at IS NULL OR q.next_attempt_at <= now()) AS due
                       FROM stripe_event_queue q JOIN stripe_events e ON e.id = q.event_id
                       WHERE q.stripe_customer_id = c.customer
                         AND (q.state = 'pending' OR q.next_attempt_at IS NOT NULL)
                       ORDER BY q.created, q.arrival_seq
                       LIMIT $2) AS w
             ) AS x
             ORDER BY c.ord, x.created, x.arrival_seq",
        )
        .bind(customers)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut found: Vec<(String, Vec<EventToApply>)> = Vec::new();
        for row in &rows {
            let owner: String = row.try_get(11)?;
            let event = event_to_apply(row)?;
            match found.last_mut() {
                Some((last, events)) if *last == owner => events.push(event),
                _ => found.push((owner, vec![event])),
            }
        }
        Ok(found)
    }

    pub(super) async fn commit_updates(
        &self,
        updates: &[CustomerUpdate],
    ) -> StoreResult<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        let conflicts = apply_remote_profiles_in(&mut tx, updates).await?;
        let done = updates
            .iter()
            .filter(|u| !conflicts.contains(&u.customer_id))
            .collect::<Vec<_>>();
        let watermarks = done
            .iter()
            .filter_map(|u| u.watermark.as_ref().map(|w| (u.customer_id.as_str(), w)))
            .collect::<Vec<_>>();
        if !watermarks.is_empty() {
            sqlx::query(
                "UPDATE customer_links l SET event_watermark = x.created, event_watermark_id = x.id
                 FROM unnest($1::text[], $2::bigint[], $3::text[]) AS x(customer, created, id)
                 WHERE l.stripe_customer_id = x.customer
                   AND (l.event_watermark IS NULL OR l.event_watermark <= x.created)",
            )
            .bind(watermarks.iter().map(|(c, _)| *c).collect::<Vec<_>>())
            .bind(watermarks.iter().map(|(_, w)| w.0).collect::<Vec<_>>())
            .bind(
                watermarks
                    .iter()
                    .map(|(_, w)| w.1.as_str())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        }
        let events = done
            .iter()
            .flat_map(|u| u.events.iter().cloned())
            .collect::<Vec<_>>();
        Self::finish_applied(&mut tx, &events, Clock::now()).await?;
        tx.commit().await?;
        Ok(conflicts)
    }
}

impl PgStore {
    /// `Users::import_users` in five statements, however many users: lock the existing rows,
    /// find the erased, write what differs, queue the pushes and announce the changes.
    pub(super) async fn import_batch(
        &self,
        users: &[UserImport],
    ) -> StoreResult<Vec<ImportOutcome>> {
        let mut tx = self.pool.begin().await?;
        // Shared with other imports, exclusive of a tombstone being written: see the gate.
        erasure_gate(&mut tx, false).await?;
        let ids = users.iter().map(|u| u.user.id.as_str()).collect::<Vec<_>>();
        // Locked in id order, as every batch locks them, so two imports never deadlock; what
        // `user.updated` says changed is then what this write changed.
        let before: Vec<UserRow> = sqlx::query_as(&sql(
            "SELECT {user_columns} FROM users u WHERE id = ANY($1) ORDER BY id {for_update}",
        ))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut before = users_by_id(before)?;
        // After the lock, so an erasure that deleted a row meanwhile (its tombstone is written
        // before its rows go) is seen here.
        let absent = users
            .iter()
            .filter(|u| !before.contains_key(u.user.id.as_str()))
            .map(|u| u.subject.clone())
            .collect::<Vec<_>>();
        let erased = erased_among(&mut tx, &absent).await?;
        let mut wanted = users
            .iter()
            .filter(|u| !erased.contains(&u.subject))
            .map(|u| &u.user)
            .collect::<Vec<_>>();
        // New rows are inserted in id order too: two batches creating the same users then
        // wait for each other instead of deadlocking.
        wanted.sort_by(|a, b| a.id.cmp(&b.id));
        let column =
            |f: fn(&UserUpsert) -> Option<&str>| wanted.iter().map(|u| f(u)).collect::<Vec<_>>();
        let written: Vec<UserRow> = sqlx::query_as(&sql(
            "INSERT INTO users (id, email, email_verified, first_name, last_name, phone, version,
                                created_at, updated_at, email_as_given)
             SELECT x.id, x.email, x.email_verified, x.first_name, x.last_name, x.phone, 1,
                    {now_ms}, {now_ms}, x.email_as_given
             FROM unnest($1::text[], $2::text[], $3::boolean[], $4::text[], $5::text[],
                         $6::text[], $7::text[])
                  AS x(id, email, email_verified, first_name, last_name, phone, email_as_given)
             ON CONFLICT (id) DO UPDATE SET {user_replaced}
             WHERE {user_differs_from_excluded}
             RETURNING {user_columns}",
        ))
        .bind(column(|u| Some(u.id.as_str())))
        .bind(column(|u| Some(u.email.as_str())))
        .bind(wanted.iter().map(|u| u.email_verified).collect::<Vec<_>>())
        .bind(column(|u| opt_str(&u.first_name)))
        .bind(column(|u| opt_str(&u.last_name)))
        .bind(column(|u| opt_str(&u.phone)))
        .bind(column(|u| u.email.as_given()))
        .fetch_all(&mut *tx)
        .await?;
        let written = users_by_id(written)?;
        // A row inserted meanwhile by another writer, exactly as this import has it, was
        // neither locked nor written here: read it, so it counts as unchanged.
        let raced = users
            .iter()
            .filter(|u| !erased.contains(&u.subject))
            .map(|u| u.user.id.as_str())
            .filter(|id| !before.contains_key(*id) && !written.contains_key(*id))
            .collect::<Vec<_>>();
        if !raced.is_empty() {
            let rows: Vec<UserRow> =
                sqlx::query_as(&sql("SELECT {user_columns} FROM users WHERE id = ANY($1)"))
                    .bind(&raced)
                    .fetch_all(&mut *tx)
                    .await?;
            before.extend(users_by_id(rows)?);
        }
        // A new row has version 1; any other existed (locked above, or inserted meanwhile by
        // another writer) and changed: a push is queued as for an admin `PUT`.
        let updated = written
            .values()
            .filter(|u| u.version > 1)
            .collect::<Vec<_>>();
        if !updated.is_empty() {
            let ids: Vec<String> = updated.iter().map(|u| u.id.to_string()).collect();
            enqueue_pushes(&mut tx, &ids, self.push_debounce, Clock::now()).await?;
            // As `upsert_user` announces: a change of a user this write saw before.
            let announced = updated
                .iter()
                .filter_map(|after| {
                    let was = before.get(after.id.as_str())?;
                    NewAppEvent::user_updated(ChangeOrigin::Admin, Some(was), after)
                })
                .collect::<Vec<_>>();
            append(&mut tx, &announced, Clock::now()).await?;
        }
        let outcomes = users
            .iter()
            .map(|u| {
                let id = u.user.id.as_str();
                match (written.get(id), before.get(id)) {
                    (Some(saved), _) if saved.version == 1 => {
                        Ok(ImportOutcome::Created(saved.clone()))
                    }
                    (Some(saved), _) => Ok(ImportOutcome::Updated(saved.clone())),
                    (None, Some(kept)) => Ok(ImportOutcome::Unchanged(kept.clone())),
                    (None, None) if erased.contains(&u.subject) => Ok(ImportOutcome::Erased),
                    (None, None) => Err(StoreError::Corrupt("user vanished during import".into())),
                }
            })
            .collect::<StoreResult<Vec<_>>>()?;
        tx.commit().await?;
        Ok(outcomes)
    }
}

fn users_by_id(rows: Vec<UserRow>) -> StoreResult<HashMap<String, User>> {
    rows.into_iter()
        .map(|row| user_from_row(row).map(|u| (u.id.to_string(), u)))
        .collect()
}

/// Writes a batch's Stripe-side profile changes, each only if its user is still at the
/// expected version, and records their values as what Stripe holds; returns the customers
/// whose user changed meanwhile.
async fn apply_remote_profiles_in(
    tx: &mut Transaction<'_, sqlx::Postgres>,
    updates: &[CustomerUpdate],
) -> StoreResult<Vec<String>> {
    let profiles = updates
        .iter()
        .filter_map(|u| u.profile.as_ref().map(|p| (u.customer_id.as_str(), p)))
        .collect::<Vec<_>>();
    if profiles.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: fn(&RemoteProfile) -> Option<&str>| {
        profiles.iter().map(|(_, p)| f(p)).collect::<Vec<_>>()
    };
    // The rows as they were, for what `user.updated` says changed; a row that moved on since
    // is not written below (its version differs), so this read needs no lock.
    let before: Vec<UserRow> =
        sqlx::query_as(&sql("SELECT {user_columns} FROM users WHERE id = ANY($1)"))
            .bind(column(|p| Some(p.user.id.as_str())))
            .fetch_all(&mut **tx)
            .await?;
    let before = users_by_id(before)?;
    let written: Vec<UserRow> = sqlx::query_as(&sql(
        "UPDATE users SET email = excluded.email, email_verified = excluded.email_verified,
                first_name = excluded.first_name, last_name = excluded.last_name,
                phone = excluded.phone, email_as_given = excluded.email_as_given,
                version = users.version + 1, updated_at = date_trunc('milliseconds', now())
         FROM unnest($1::text[], $2::text[], $3::boolean[], $4::text[], $5::text[], $6::text[],
                     $7::bigint[], $8::text[])
              AS excluded(id, email, email_verified, first_name, last_name, phone, expected,
                          email_as_given)
         WHERE users.id = excluded.id AND users.version = excluded.expected
           AND {user_differs_from_excluded}
         RETURNING {user_columns_qualified}",
    ))
    .bind(column(|p| Some(p.user.id.as_str())))
    .bind(column(|p| Some(p.user.email.as_str())))
    .bind(
        profiles
            .iter()
            .map(|(_, p)| p.user.email_verified)
            .collect::<Vec<_>>(),
    )
    .bind(column(|p| opt_str(&p.user.first_name)))
    .bind(column(|p| opt_str(&p.user.last_name)))
    .bind(column(|p| opt_str(&p.user.phone)))
    .bind(profiles.iter().map(|(_, p)| p.expected).collect::<Vec<_>>())
    .bind(column(|p| p.user.email.as_given()))
    .fetch_all(&mut **tx)
    .await?;
    let mut version_of = HashMap::new();
    let mut announced = Vec::new();
    for row in written {
        let after = user_from_row(row)?;
        let was = before.get(after.id.as_str());
        announced.extend(NewAppEvent::user_updated(ChangeOrigin::Stripe, was, &after));
        version_of.insert(after.id.to_string(), after.version);
    }
    append(tx, &announced, Clock::now()).await?;
    let mut conflicts = Vec::new();
    let mut pushed = Vec::new();
    for (customer, profile) in &profiles {
        match version_of.get(profile.user.id.as_str()) {
            Some(version) => pushed.push((profile, *version)),
            None => conflicts.push((*customer).to_owned()),
        }
    }
    if !pushed.is_empty() {
        let column = |f: fn(&PushedProfile) -> Option<&str>| {
            pushed.iter().map(|(p, _)| f(&p.pushed)).collect::<Vec<_>>()
        };
        sqlx::query(
            "UPDATE customer_links l SET pushed_email = x.email, pushed_name = x.name,
                    pushed_phone = x.phone, pushed_version = x.version, pushed_at = now()
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                  AS x(user_id, email, name, phone, version)
             WHERE l.user_id = x.user_id",
        )
        .bind(
            pushed
                .iter()
                .map(|(p, _)| p.user.id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(column(|p| Some(p.email.as_str())))
        .bind(column(|p| p.name.as_deref()))
        .bind(column(|p| p.phone.as_deref()))
        .bind(pushed.iter().map(|(_, v)| *v).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(conflicts)
}
