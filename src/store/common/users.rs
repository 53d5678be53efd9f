use std::{collections::HashSet, time::Duration};

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    app_events::append,
    dialect::{begin_write, db_time, ids, span, sql, time, Clock, Clocked, Connection, Db, Time},
    links::record_pushed,
    rows::{user_from_row, UserRow},
    Backend,
};
use crate::{
    domain::{
        ChangeOrigin, ImportOutcome, NewAppEvent, PushedProfile, UsageRecord, User, UserId,
        UserImport, UserUpsert,
    },
    store::{opt_str, traits::Users, StoreError, StoreResult},
};

type UserQuery<'q> = sqlx::query::QueryAs<'q, Db, UserRow, <Db as sqlx::Database>::Arguments<'q>>;

/// Binds `$1`..`$6`, the user and their profile, as `{user_changed}` compares them.
fn bind_profile<'q>(query: UserQuery<'q>, user: &'q UserUpsert) -> UserQuery<'q> {
    query
        .bind(user.id.as_str())
        .bind(user.email.as_str())
        .bind(user.email_verified)
        .bind(opt_str(&user.first_name))
        .bind(opt_str(&user.last_name))
        .bind(opt_str(&user.phone))
}

/// Queues a push of the user's profile, unless one is already pending (it will push the
/// newest state when it runs).
async fn enqueue_push(
    db: &mut Connection,
    user: &UserId,
    debounce: Duration,
    now: Clock,
) -> StoreResult<()> {
    enqueue_pushes(db, &[user.to_string()], debounce, now).await
}

/// [`enqueue_push`] for several users (existing ones) in one statement: an import batch's.
/// The conflict clause is the partial unique index's predicate, written here once.
pub(crate) async fn enqueue_pushes(
    db: &mut Connection,
    users: &[String],
    debounce: Duration,
    now: Clock,
) -> StoreResult<()> {
    sqlx::query(&sql(
        "INSERT INTO outbox (kind, user_id, payload, state, attempts, next_attempt_at,
                             created_at, updated_at)
         SELECT 'push_profile', id, '{}', 'pending', 0, {later $2}, {now}, {now}
         FROM users WHERE id {in $1}
         ON CONFLICT (user_id) WHERE kind = 'push_profile' AND state = 'pending' DO NOTHING",
    ))
    .bind(ids(users))
    .bind(span(debounce))
    .clock(now)
    .execute(db)
    .await?;
    Ok(())
}

/// Writes the user's profile if its version is still `expected` and something differs;
/// the new row, or `None`.
pub(crate) async fn update_user_in(
    db: &mut Connection,
    user: &UserUpsert,
    expected: i64,
    origin: ChangeOrigin,
    now: Clock,
) -> StoreResult<Option<User>> {
    let before = get_user_in(db, &user.id).await?;
    let statement = sql(
        "UPDATE users SET email = $2, email_verified = $3, first_name = $4, last_name = $5,
                phone = $6, email_as_given = $8, version = users.version + 1,
                updated_at = {now_ms}
         WHERE users.id = $1 AND users.version = $7 AND {user_changed}
         RETURNING {user_columns}",
    );
    let row: Option<UserRow> = bind_profile(sqlx::query_as(&statement), user)
        .bind(expected)
        .bind(user.email.as_given())
        .clock(now)
        .fetch_optional(&mut *db)
        .await?;
    let Some(saved) = row.map(user_from_row).transpose()? else {
        return Ok(None);
    };
    announce_user_change(db, origin, before.as_ref(), &saved, now).await?;
    Ok(Some(saved))
}

/// `user.updated`, when a profile field of an existing user really changed.
async fn announce_user_change(
    db: &mut Connection,
    origin: ChangeOrigin,
    before: Option<&User>,
    after: &User,
    now: Clock,
) -> StoreResult<()> {
    if before.is_none() {
        return Ok(());
    }
    match NewAppEvent::user_updated(origin, before, after) {
        Some(event) => append(db, &[event], now).await,
        None => Ok(()),
    }
}

pub(crate) async fn get_user_in(db: &mut Connection, id: &UserId) -> StoreResult<Option<User>> {
    let row: Option<UserRow> =
        sqlx::query_as(&sql("SELECT {user_columns} FROM users WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(db)
            .await?;
    row.map(user_from_row).transpose()
}

/// Creates the user or replaces their profile inside the caller's transaction (see
/// `Users::upsert_user_from`); the row as it was, if it was, and as it is.
pub(crate) async fn upsert_user_in(
    db: &mut Connection,
    user: &UserUpsert,
    origin: ChangeOrigin,
    push_debounce: Duration,
    now: Clock,
) -> StoreResult<(Option<User>, User)> {
    // Locked, so that what `user.updated` says changed is what this write changed.
    let before: Option<UserRow> = sqlx::query_as(&sql(
        "SELECT {user_columns} FROM users u WHERE id = $1 {for_update}",
    ))
    .bind(user.id.as_str())
    .fetch_optional(&mut *db)
    .await?;
    let before = before.map(user_from_row).transpose()?;
    let statement = sql(
        "INSERT INTO users (id, email, email_verified, first_name, last_name, phone, version,
                            created_at, updated_at, email_as_given)
         VALUES ($1, $2, $3, $4, $5, $6, 1, {now_ms}, {now_ms}, $7)
         ON CONFLICT (id) DO UPDATE SET {user_replaced}
         WHERE {user_changed}
         RETURNING {user_columns}",
    );
    let written: Option<UserRow> = bind_profile(sqlx::query_as(&statement), user)
        .bind(user.email.as_given())
        .clock(now)
        .fetch_optional(&mut *db)
        .await?;
    let saved = match written {
        Some(row) => {
            let saved = user_from_row(row)?;
            if saved.version > 1 {
                enqueue_push(db, &saved.id, push_debounce, now).await?;
            }
            announce_user_change(db, origin, before.as_ref(), &saved, now).await?;
            saved
        }
        // Nothing changed: the row is as requested already (read again if it was not there
        // to lock: another writer inserted it meanwhile).
        None => match &before {
            Some(row) => row.clone(),
            None => get_user_in(db, &user.id)
                .await?
                .ok_or_else(|| StoreError::Corrupt("user vanished during upsert".into()))?,
        },
    };
    Ok((before, saved))
}

/// Which of these tombstone subjects were erased.
pub(crate) async fn erased_among(
    db: &mut Connection,
    subjects: &[String],
) -> StoreResult<HashSet<String>> {
    if subjects.is_empty() {
        return Ok(HashSet::new());
    }
    let found: Vec<String> = sqlx::query_scalar(&sql(
        "SELECT subject FROM erasure_tombstones WHERE subject {in $1}",
    ))
    .bind(ids(subjects))
    .fetch_all(db)
    .await?;
    Ok(found.into_iter().collect())
}

#[async_trait]
impl Users for Backend {
    async fn upsert_user_from(&self, user: &UserUpsert, origin: ChangeOrigin) -> StoreResult<User> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        let (_, saved) = upsert_user_in(&mut tx, user, origin, self.push_debounce, now).await?;
        tx.commit().await?;
        Ok(saved)
    }

    async fn import_users(&self, users: &[UserImport]) -> StoreResult<Vec<ImportOutcome>> {
        // A batch writes each id once (a statement may not touch a row twice); an id that
        // comes again starts the next batch, so the later row wins, as in a file read in order.
        let mut outcomes = Vec::with_capacity(users.len());
        let mut rest = users;
        while !rest.is_empty() {
            let mut seen = std::collections::HashSet::new();
            let distinct = rest
                .iter()
                .take_while(|u| seen.insert(u.user.id.as_str()))
                .count();
            let (batch, after) = rest.split_at(distinct);
            outcomes.extend(self.import_batch(batch).await?);
            rest = after;
        }
        Ok(outcomes)
    }

    async fn update_user_if_version(
        &self,
        user: &UserUpsert,
        expected: i64,
    ) -> StoreResult<Option<User>> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        let outcome = match update_user_in(&mut tx, user, expected, ChangeOrigin::App, now).await? {
            Some(saved) => {
                enqueue_push(&mut tx, &saved.id, self.push_debounce, now).await?;
                Some(saved)
            }
            None => get_user_in(&mut tx, &user.id)
                .await?
                .filter(|current| current.version == expected),
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn apply_remote_profile(
        &self,
        user: &UserUpsert,
        expected: i64,
        pushed: &PushedProfile,
    ) -> StoreResult<Option<User>> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        let Some(saved) =
            update_user_in(&mut tx, user, expected, ChangeOrigin::Stripe, now).await?
        else {
            tx.rollback().await?;
            return Ok(None);
        };
        record_pushed(&mut tx, &user.id, pushed, saved.version, None, now).await?;
        tx.commit().await?;
        Ok(Some(saved))
    }

    async fn get_user(&self, id: &UserId) -> StoreResult<Option<User>> {
        get_user_in(&mut *self.pool.acquire().await?, id).await
    }

    async fn users_by_ids(&self, wanted: &[String]) -> StoreResult<Vec<User>> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<UserRow> =
            sqlx::query_as(&sql("SELECT {user_columns} FROM users WHERE id {in $1}"))
                .bind(ids(wanted))
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(user_from_row).collect()
    }

    async fn queue_profile_push(&self, user: &UserId) -> StoreResult<()> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        enqueue_push(&mut tx, user, self.push_debounce, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_usage_record(
        &self,
        user: &UserId,
        metric: &str,
        quantity: i64,
        recorded_at: OffsetDateTime,
    ) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(&sql(
            "INSERT INTO usage_records (user_id, metric, quantity, recorded_at, created_at)
             VALUES ($1, $2, $3, $4, {now_ms}) RETURNING id",
        ))
        .bind(user.as_str())
        .bind(metric)
        .bind(quantity)
        .bind(db_time(recorded_at))
        .clock(Clock::now())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn usage_records_page(
        &self,
        user: &UserId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<UsageRecord>> {
        let rows: Vec<(i64, String, i64, Time, Time)> = sqlx::query_as(
            "SELECT id, metric, quantity, recorded_at, created_at FROM usage_records
             WHERE user_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(user.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, metric, quantity, recorded_at, created_at)| {
                Ok(UsageRecord {
                    id,
                    metric,
                    quantity,
                    recorded_at: time(recorded_at)?,
                    created_at: time(created_at)?,
                })
            })
            .collect()
    }
}
