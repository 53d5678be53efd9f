//! The app-event outbox: events written inside the transactions of the changes they announce
//! (`append`), put in their total order once committed (`sequence_app_events`), handed to the
//! deliverer one per key at a time, and paged by the pull API.

use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    dialect::{begin_write, db_time, ids, span, sql, time, Clock, Clocked, Connection, Time},
    Backend,
};
use crate::{
    domain::{
        new_app_event_id, AppEvent, AppEventOutcome, AppEventState, AppEventType, NewAppEvent,
    },
    store::{clip_error, parse_json, traits::AppEvents, StoreError, StoreResult},
};

macro_rules! app_event_columns {
    () => {
        "position, id, type, event_key, data, created_at, state, attempts, last_error,
         next_attempt_at, delivered_at, claim_token"
    };
}

type AppEventRow = (
    Option<i64>,
    String,
    String,
    String,
    String,
    Time,
    String,
    i32,
    Option<String>,
    Time,
    Option<Time>,
    Option<String>,
);

fn app_event_from_row(row: AppEventRow) -> StoreResult<AppEvent> {
    let (position, id, kind, key, data, created, state, attempts, error, next, delivered, token) =
        row;
    Ok(AppEvent {
        position: position.unwrap_or(0),
        id,
        kind: AppEventType::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown app event type {kind:?}")))?,
        key,
        data: parse_json(&data)?,
        created_at: time(created)?,
        state: AppEventState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown app event state {state:?}")))?,
        attempts,
        last_error: error,
        next_attempt_at: time(next)?,
        delivered_at: delivered.map(time).transpose()?,
        claim_token: token,
    })
}

/// Writes app events inside the caller's transaction, after the change they announce (so
/// that a key's events are inserted in the order its changes took their row locks).
pub(crate) async fn append(
    db: &mut Connection,
    events: &[NewAppEvent],
    now: Clock,
) -> StoreResult<()> {
    let statement = sql(
        "INSERT INTO app_events (id, type, event_key, data, created_at, next_attempt_at)
         VALUES ($1, $2, $3, $4, {now_ms}, {now_ms})",
    );
    for event in events {
        sqlx::query(&statement)
            .bind(new_app_event_id())
            .bind(event.kind.as_str())
            .bind(&event.key)
            .bind(event.data.to_string())
            .clock(now)
            .execute(&mut *db)
            .await?;
    }
    Ok(())
}

/// Moves each of `keys`' heads to its key's first pending event, or removes it when there is
/// none, inside the caller's transaction (which has already finished the events that were
/// heads).
///
/// The heads are locked first, in key order, and only then is the next pending event looked
/// up, by a statement of its own: on Postgres each statement sees what committed before it
/// began, so a sequencer that was positioning one of these keys' events (and holds its head,
/// see `sequence_app_events`) has committed by then and its events are seen; one that comes
/// after waits for this commit and adds its own head.
pub(crate) async fn advance_heads(db: &mut Connection, mut keys: Vec<String>) -> StoreResult<()> {
    if keys.is_empty() {
        return Ok(());
    }
    keys.sort_unstable();
    keys.dedup();
    sqlx::query(&sql(
        "SELECT u.event_key FROM app_event_heads u WHERE u.event_key {in $1}
         ORDER BY u.event_key {for_update}",
    ))
    .bind(ids(&keys))
    .execute(&mut *db)
    .await?;
    sqlx::query(&sql("UPDATE app_event_heads SET position = (
            SELECT min(e.position) FROM app_events e
            WHERE e.event_key = app_event_heads.event_key AND e.state = 'pending'
              AND e.position IS NOT NULL
         )
         WHERE event_key {in $1}"))
    .bind(ids(&keys))
    .execute(&mut *db)
    .await?;
    sqlx::query(&sql(
        "DELETE FROM app_event_heads WHERE event_key {in $1} AND position IS NULL",
    ))
    .bind(ids(&keys))
    .execute(&mut *db)
    .await?;
    Ok(())
}

#[async_trait]
impl AppEvents for Backend {
    async fn sequence_app_events(&self, limit: u32) -> StoreResult<u64> {
        // Most rounds find nothing new; a read says so without a write transaction.
        let waiting: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM app_events WHERE position IS NULL)")
                .fetch_one(&self.pool)
                .await?;
        if !waiting {
            return Ok(0);
        }
        let mut tx = begin_write(&self.pool).await?;
        // Holding the sequencer's row makes this the only sequencer until commit; what it reads
        // next includes everything the one before it positioned.
        let last: i64 = sqlx::query_scalar(
            "UPDATE app_event_sequencer SET last_position = last_position WHERE id = 1
             RETURNING last_position",
        )
        .fetch_one(&mut *tx)
        .await?;
        let positioned = sqlx::query(
            "UPDATE app_events SET position = $1 + ranked.n
             FROM (SELECT seq, row_number() OVER (ORDER BY seq) AS n
                   FROM (SELECT seq FROM app_events WHERE position IS NULL
                         ORDER BY seq LIMIT $2) AS waiting) AS ranked
             WHERE app_events.seq = ranked.seq",
        )
        .bind(last)
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE app_event_sequencer SET last_position = $1 WHERE id = 1")
            .bind(last + positioned as i64)
            .execute(&mut *tx)
            .await?;
        // A key that had no pending event gets its first one as head; one that had keeps its
        // earlier head. The row lock the update takes on an existing head makes a finisher
        // moving that head wait for this commit, so it sees these events (`advance_heads`).
        // Keys in order, as `advance_heads` locks them: two writers never wait on each other.
        sqlx::query(&sql(
            "INSERT INTO app_event_heads (event_key, position)
             SELECT event_key, min(position) FROM app_events
             WHERE position > $1 AND position <= $2
             GROUP BY event_key ORDER BY event_key
             ON CONFLICT (event_key) DO UPDATE
             SET position = {least}(app_event_heads.position, excluded.position)",
        ))
        .bind(last)
        .bind(last + positioned as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(positioned)
    }

    async fn claim_app_events(
        &self,
        keys: u32,
        per_key: u32,
        lease: Duration,
    ) -> StoreResult<Vec<AppEvent>> {
        let now = Clock::now();
        // First each key's first pending event, which its head names; the lease check is
        // repeated on the row itself, so of two instances claiming at once only one takes it.
        let statement = sql(concat!(
            "WITH due AS (
                SELECT e.seq FROM app_event_heads h JOIN app_events e ON e.position = h.position
                WHERE e.state = 'pending' AND e.next_attempt_at <= {now}
                  AND (e.locked_until IS NULL OR e.locked_until < {now})
                ORDER BY h.position LIMIT $1
             )
             UPDATE app_events SET attempts = attempts + 1, claim_token = {new_token},
                    locked_until = {later $2}
             WHERE seq IN (SELECT seq FROM due) AND state = 'pending'
               AND (locked_until IS NULL OR locked_until < {now})
             RETURNING ",
            app_event_columns!()
        ));
        let mut rows: Vec<AppEventRow> = sqlx::query_as(&statement)
            .bind(i64::from(keys))
            .bind(span(lease))
            .clock(now)
            .fetch_all(&self.pool)
            .await?;
        // Then, for the keys whose head this claim won, and only those, the pending events
        // that follow the head (the key's first: row number 1). Whoever holds a key's head
        // owns the key: no other claimer reaches its events except through the head, so
        // these need no lease check of their own. (One left locked by an earlier holder is
        // stale: that holder's head lease ran out, and it starts no send it could not finish
        // before then.) Row numbers over the keys' index, not a subquery per row: a per-row
        // subquery let a poor plan (a scan per candidate) stall the deliverer for minutes.
        if per_key > 1 && !rows.is_empty() {
            // (A redelivery between the two statements can put an older event first; the
            // heads claimed above are then not taken a second time.)
            let won: Vec<String> = rows.iter().map(|row| row.3.clone()).collect();
            let heads: Vec<String> = rows.iter().map(|row| row.1.clone()).collect();
            let statement = sql(concat!(
                "WITH run AS (
                    SELECT seq, row_number() OVER (
                        PARTITION BY event_key ORDER BY position
                    ) AS n
                    FROM app_events
                    WHERE event_key {in $1} AND state = 'pending' AND position IS NOT NULL
                 )
                 UPDATE app_events SET attempts = attempts + 1, claim_token = {new_token},
                        locked_until = {later $2}
                 WHERE seq IN (SELECT seq FROM run WHERE n BETWEEN 2 AND $3)
                   AND state = 'pending' AND NOT (id {in $4})
                 RETURNING ",
                app_event_columns!()
            ));
            let followers: Vec<AppEventRow> = sqlx::query_as(&statement)
                .bind(ids(&won))
                .bind(span(lease))
                .bind(i64::from(per_key))
                .bind(ids(&heads))
                .clock(now)
                .fetch_all(&self.pool)
                .await?;
            rows.extend(followers);
        }
        let mut events = rows
            .into_iter()
            .map(app_event_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        events.sort_by_key(|e| e.position);
        Ok(events)
    }

    async fn finish_app_events(&self, finished: &[(AppEvent, AppEventOutcome)]) -> StoreResult<()> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        // Delivered ones, the usual case, in one statement: a claim token names one claim of
        // one event (random, so a row whose token is among them is one of these claims); the
        // ids let the statement find the rows by their index.
        let (delivered_ids, delivered_tokens): (Vec<String>, Vec<String>) = finished
            .iter()
            .filter(|(_, outcome)| *outcome == AppEventOutcome::Delivered)
            .filter_map(|(event, _)| Some((event.id.clone(), event.claim_token.clone()?)))
            .unzip();
        if !delivered_ids.is_empty() {
            sqlx::query(&sql(
                "UPDATE app_events SET state = 'delivered', delivered_at = {now},
                        last_error = NULL, claim_token = NULL, locked_until = NULL
                 WHERE id {in $1} AND claim_token {in $2}",
            ))
            .bind(ids(&delivered_ids))
            .bind(ids(&delivered_tokens))
            .clock(now)
            .execute(&mut *tx)
            .await?;
        }
        for (event, outcome) in finished {
            let Some(token) = event.claim_token.as_deref() else {
                continue;
            };
            let (state, error, at) = match outcome {
                AppEventOutcome::Delivered => continue,
                AppEventOutcome::Released => {
                    sqlx::query(
                        "UPDATE app_events SET attempts = attempts - 1, claim_token = NULL,
                                locked_until = NULL
                         WHERE id = $1 AND claim_token = $2",
                    )
                    .bind(&event.id)
                    .bind(token)
                    .execute(&mut *tx)
                    .await?;
                    continue;
                }
                AppEventOutcome::Retry { at, error } => ("pending", error, *at),
                AppEventOutcome::Failed { error } => ("failed", error, event.next_attempt_at),
            };
            sqlx::query(
                "UPDATE app_events SET state = $1, last_error = $2, next_attempt_at = $3,
                        claim_token = NULL, locked_until = NULL
                 WHERE id = $4 AND claim_token = $5",
            )
            .bind(state)
            .bind(clip_error(error))
            .bind(db_time(at))
            .bind(&event.id)
            .bind(token)
            .execute(&mut *tx)
            .await?;
        }
        // A retried event stays its key's head, and one handed back was never it; a
        // delivered or parked one makes way.
        let done: Vec<String> = finished
            .iter()
            .filter(|(event, outcome)| {
                event.claim_token.is_some()
                    && matches!(
                        outcome,
                        AppEventOutcome::Delivered | AppEventOutcome::Failed { .. }
                    )
            })
            .map(|(event, _)| event.key.clone())
            .collect();
        advance_heads(&mut tx, done).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn app_events_after(&self, after: i64, limit: u32) -> StoreResult<Vec<AppEvent>> {
        let rows: Vec<AppEventRow> = sqlx::query_as(concat!(
            "SELECT ",
            app_event_columns!(),
            " FROM app_events WHERE position > $1 ORDER BY position LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(app_event_from_row).collect()
    }

    async fn list_app_events(
        &self,
        state: AppEventState,
        limit: u32,
    ) -> StoreResult<Vec<AppEvent>> {
        let rows: Vec<AppEventRow> = sqlx::query_as(concat!(
            "SELECT ",
            app_event_columns!(),
            " FROM app_events WHERE state = $1 ORDER BY seq DESC LIMIT $2"
        ))
        .bind(state.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(app_event_from_row).collect()
    }

    async fn redeliver_app_event(&self, id: &str) -> StoreResult<Option<AppEvent>> {
        let mut tx = begin_write(&self.pool).await?;
        let row: Option<AppEventRow> = sqlx::query_as(&sql(concat!(
            "UPDATE app_events SET state = 'pending', attempts = 0, last_error = NULL,
                    next_attempt_at = {now}, delivered_at = NULL, claim_token = NULL,
                    locked_until = NULL
             WHERE id = $1 RETURNING ",
            app_event_columns!()
        )))
        .bind(id)
        .clock(Clock::now())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(event) = row.map(app_event_from_row).transpose()? else {
            return Ok(None);
        };
        // Its key's head, unless that is earlier still (an event not yet positioned gets its
        // head from the sequencer).
        if event.position > 0 {
            sqlx::query(&sql(
                "INSERT INTO app_event_heads (event_key, position) VALUES ($1, $2)
                 ON CONFLICT (event_key) DO UPDATE
                 SET position = {least}(app_event_heads.position, excluded.position)",
            ))
            .bind(&event.key)
            .bind(event.position)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Some(event))
    }

    async fn prune_app_events(
        &self,
        cutoff: OffsetDateTime,
        with_pending: bool,
    ) -> StoreResult<u64> {
        let mut tx = begin_write(&self.pool).await?;
        let pruned = sqlx::query(
            "DELETE FROM app_events WHERE created_at < $1 AND (state <> 'pending' OR $2)",
        )
        .bind(db_time(cutoff))
        .bind(with_pending)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if with_pending && pruned > 0 {
            let orphaned: Vec<String> = sqlx::query_scalar(
                "SELECT event_key FROM app_event_heads h
                 WHERE NOT EXISTS (SELECT 1 FROM app_events e WHERE e.position = h.position)",
            )
            .fetch_all(&mut *tx)
            .await?;
            advance_heads(&mut tx, orphaned).await?;
        }
        tx.commit().await?;
        Ok(pruned)
    }

    async fn app_event_backlog(&self) -> StoreResult<(i64, Option<OffsetDateTime>)> {
        let (count, oldest): (i64, Option<Time>) = sqlx::query_as(
            "SELECT count(*), min(created_at) FROM app_events WHERE state = 'pending'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((count, oldest.map(time).transpose()?))
    }
}
