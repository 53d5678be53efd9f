use async_trait::async_trait;

use std::collections::HashMap;

use serde_json::Value;

use super::{
    app_events::append,
    dialect::{begin_write, db_time, ids, sql, time, Clock, Clocked, Connection, Time},
    Backend,
};
use crate::{
    domain::{NewAppEvent, SubscriptionMirror, UserId},
    plans::{announcement, plan_json, Announced, Plans},
    store::{
        items_from_json, items_json, parse_json,
        traits::{PlanAnnouncements, Subscriptions},
        StoreError, StoreResult,
    },
};

const SUBSCRIPTION_COLUMNS: &str = "id, user_id, stripe_customer_id, status, price_id, \
     cancel_at_period_end, current_period_end, updated_at, cancel_at, canceled_at, ended_at, items";

type SubscriptionRow = (
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    bool,
    Option<Time>,
    Time,
    Option<Time>,
    Option<Time>,
    Option<Time>,
    String,
);

/// The mirrored subscriptions that `filter` (a `WHERE` on `$1`) picks, by id; `locked`: row
/// locks held until the transaction ends (Postgres).
async fn subscriptions_where(
    db: &mut Connection,
    filter: &str,
    value: &str,
    locked: bool,
) -> StoreResult<Vec<SubscriptionMirror>> {
    let lock = if locked { " {for_update}" } else { "" };
    let statement = sql(&format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions u WHERE {filter} ORDER BY id{lock}"
    ));
    let rows = sqlx::query_as(&statement).bind(value).fetch_all(db).await?;
    mirrors(rows)
}

/// The mirrored subscriptions whose `column` (`id`, `user_id`) is one of `values`.
async fn subscriptions_with(
    db: &mut Connection,
    column: &str,
    values: &[String],
) -> StoreResult<Vec<SubscriptionMirror>> {
    let statement = sql(&format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE {column} {{in $1}} ORDER BY id"
    ));
    let rows = sqlx::query_as(&statement)
        .bind(ids(values))
        .fetch_all(db)
        .await?;
    mirrors(rows)
}

fn mirrors(rows: Vec<SubscriptionRow>) -> StoreResult<Vec<SubscriptionMirror>> {
    let at = |value: Option<Time>| value.map(time).transpose();
    rows.into_iter()
        .map(|row| {
            Ok(SubscriptionMirror {
                id: row.0,
                user_id: row
                    .1
                    .map(|u| UserId::parse(&u))
                    .transpose()
                    .map_err(|e| StoreError::Corrupt(e.message))?,
                customer_id: row.2,
                status: row.3,
                price_id: row.4,
                cancel_at_period_end: row.5,
                current_period_end: at(row.6)?,
                updated_at: time(row.7)?,
                cancel_at: at(row.8)?,
                canceled_at: at(row.9)?,
                ended_at: at(row.10)?,
                items: items_from_json(&row.11)?,
            })
        })
        .collect()
}

/// Appends what a subscription's change tells the app (see
/// [`NewAppEvent::subscription_change`]); returns its user, whose plan the caller then
/// announces.
async fn announce_subscription_change<'a>(
    db: &mut Connection,
    before: Option<&SubscriptionMirror>,
    after: &'a SubscriptionMirror,
    now: Clock,
) -> StoreResult<Option<&'a UserId>> {
    if let Some(event) = NewAppEvent::subscription_change(before, after) {
        append(db, &[event], now).await?;
    }
    Ok(after.user_id.as_ref())
}

async fn announced_plans(
    db: &mut Connection,
    users: &[String],
) -> StoreResult<HashMap<String, Announced>> {
    let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(&sql(
        "SELECT user_id, plan_id, plan FROM user_plans WHERE user_id {in $1}",
    ))
    .bind(ids(users))
    .fetch_all(&mut *db)
    .await?;
    rows.into_iter()
        .map(|(user, plan_id, plan)| {
            let plan = plan.as_deref().map(parse_json).transpose()?;
            Ok((user, Announced { plan_id, plan }))
        })
        .collect()
}

/// Announces `computed` to one user if they were told something else (see [`announcement`]),
/// recording what they were told; a row from before contents were recorded gets its content.
async fn settle_plan(
    db: &mut Connection,
    user: &UserId,
    announced: Option<&Announced>,
    unrecorded: Option<&Value>,
    computed: Option<&Value>,
    now: Clock,
) -> StoreResult<()> {
    let previous = announcement(announced, unrecorded, computed);
    let backfill = announced.is_some_and(|row| row.plan.is_none() && computed.is_some());
    if previous.is_none() && !backfill {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO user_plans (user_id, plan_id, plan) VALUES ($1, $2, $3)
         ON CONFLICT (user_id) DO UPDATE SET plan_id = excluded.plan_id, plan = excluded.plan",
    )
    .bind(user.as_str())
    .bind(computed.and_then(|p| p["id"].as_str()))
    .bind(computed.map(Value::to_string))
    .execute(&mut *db)
    .await?;
    if let Some(previous) = previous {
        let event = NewAppEvent::plan_changed(user, computed, previous.as_deref());
        append(db, &[event], now).await?;
    }
    Ok(())
}

/// Tells each of `users` (their rows locked by the caller) whose plan, computed from their
/// mirrored subscriptions, differs from what they were told; `unrecorded` is what users
/// without a `user_plans` row were told.
async fn settle_plans(
    db: &mut Connection,
    plans: &Plans,
    users: &[String],
    unrecorded: Option<&Value>,
    now: Clock,
) -> StoreResult<()> {
    let mut subscriptions: HashMap<String, Vec<SubscriptionMirror>> = HashMap::new();
    for subscription in subscriptions_with(db, "user_id", users).await? {
        if let Some(user) = &subscription.user_id {
            let user = user.as_str().to_owned();
            subscriptions.entry(user).or_default().push(subscription);
        }
    }
    let announced = announced_plans(db, users).await?;
    for user in users {
        let of_user = subscriptions.get(user).map_or(&[][..], Vec::as_slice);
        let computed = plan_json(plans.plan_for(of_user));
        let user_id = UserId::parse(user).map_err(|e| StoreError::Corrupt(e.message))?;
        let told = announced.get(user);
        settle_plan(db, &user_id, told, unrecorded, computed.as_ref(), now).await?;
    }
    Ok(())
}

/// Writes `plan.changed` if the user's plan, computed from their mirrored subscriptions,
/// differs from the one last announced (no row: the default plan).
async fn announce_plan(
    db: &mut Connection,
    plans: &Plans,
    user: &UserId,
    now: Clock,
) -> StoreResult<()> {
    if plans.is_empty() {
        return Ok(());
    }
    // The user's row lock orders this against the start-up pass over the same user, so the
    // last to commit has read what the other wrote.
    sqlx::query(&sql(
        "SELECT u.id FROM users u WHERE u.id = $1 {for_update}",
    ))
    .bind(user.as_str())
    .execute(&mut *db)
    .await?;
    let unrecorded = plan_json(plans.default_plan());
    let users = [user.as_str().to_owned()];
    settle_plans(db, plans, &users, unrecorded.as_ref(), now).await
}

#[async_trait]
impl PlanAnnouncements for Backend {
    async fn plans_file_announced(&self) -> StoreResult<bool> {
        let announced: Option<String> =
            sqlx::query_scalar("SELECT plans FROM plans_announced WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?;
        Ok(match announced {
            Some(announced) => announced == self.plans.canonical(),
            // Never recorded: nothing to do until a plans file is given.
            None => self.plans.is_empty(),
        })
    }

    async fn announce_plans_page(
        &self,
        after: Option<&UserId>,
        limit: u32,
    ) -> StoreResult<Option<UserId>> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        let users: Vec<String> = sqlx::query_scalar(&sql(
            "SELECT u.id FROM users u WHERE u.id > $1 ORDER BY u.id LIMIT $2 {for_update}",
        ))
        .bind(after.map_or("", UserId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = users.last() else {
            return Ok(None);
        };
        let last = UserId::parse(last).map_err(|e| StoreError::Corrupt(e.message))?;
        // Users without a row were told the default of the file last announced to everyone.
        let recorded: Option<Option<String>> =
            sqlx::query_scalar("SELECT default_plan FROM plans_announced WHERE id = 1")
                .fetch_optional(&mut *tx)
                .await?;
        let unrecorded = match recorded {
            Some(default) => default.as_deref().map(parse_json).transpose()?,
            None => plan_json(self.plans.default_plan()),
        };
        settle_plans(&mut tx, &self.plans, &users, unrecorded.as_ref(), now).await?;
        tx.commit().await?;
        Ok(Some(last))
    }

    async fn record_plans_file_announced(&self) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO plans_announced (id, plans, default_plan) VALUES (1, $1, $2)
             ON CONFLICT (id) DO UPDATE SET plans = excluded.plans,
                                            default_plan = excluded.default_plan",
        )
        .bind(self.plans.canonical())
        .bind(plan_json(self.plans.default_plan()).map(|p| p.to_string()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Subscriptions for Backend {
    async fn list_subscriptions(&self, user: &UserId) -> StoreResult<Vec<SubscriptionMirror>> {
        let mut db = self.pool.acquire().await?;
        subscriptions_where(&mut db, "user_id = $1", user.as_str(), false).await
    }

    async fn subscriptions_by_ids(
        &self,
        wanted: &[String],
    ) -> StoreResult<Vec<SubscriptionMirror>> {
        let mut db = self.pool.acquire().await?;
        subscriptions_with(&mut db, "id", wanted).await
    }

    async fn upsert_subscription_if_newer(
        &self,
        sub: &SubscriptionMirror,
        created: i64,
        event_id: &str,
    ) -> StoreResult<bool> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        // Locked (Postgres), so what the app hears changed is what this write changed.
        let before = subscriptions_where(&mut tx, "id = $1", &sub.id, true)
            .await?
            .pop();
        let written = sqlx::query(
            "INSERT INTO subscriptions (id, user_id, stripe_customer_id, status, price_id,
                                        cancel_at_period_end, current_period_end, event_watermark,
                                        event_watermark_id, created_at, updated_at, cancel_at,
                                        canceled_at, ended_at, items)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $10, $9, $9, $11, $12, $13, $14)
             ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id,
                stripe_customer_id = excluded.stripe_customer_id, status = excluded.status,
                price_id = excluded.price_id, cancel_at_period_end = excluded.cancel_at_period_end,
                current_period_end = excluded.current_period_end,
                event_watermark = excluded.event_watermark,
                event_watermark_id = excluded.event_watermark_id, updated_at = excluded.updated_at,
                cancel_at = excluded.cancel_at, canceled_at = excluded.canceled_at,
                ended_at = excluded.ended_at, items = excluded.items
             WHERE subscriptions.event_watermark IS NULL
                OR subscriptions.event_watermark <= excluded.event_watermark",
        )
        .bind(&sub.id)
        .bind(sub.user_id.as_ref().map(UserId::as_str))
        .bind(&sub.customer_id)
        .bind(&sub.status)
        .bind(&sub.price_id)
        .bind(sub.cancel_at_period_end)
        .bind(sub.current_period_end.map(db_time))
        .bind(created)
        .bind(db_time(sub.updated_at))
        .bind(event_id)
        .bind(sub.cancel_at.map(db_time))
        .bind(sub.canceled_at.map(db_time))
        .bind(sub.ended_at.map(db_time))
        .bind(items_json(&sub.items))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if written {
            if let Some(user) =
                announce_subscription_change(&mut tx, before.as_ref(), sub, now).await?
            {
                announce_plan(&mut tx, &self.plans, user, now).await?;
            }
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn subscription_watermark(&self, id: &str) -> StoreResult<Option<(i64, Option<String>)>> {
        let row: Option<(Option<i64>, Option<String>)> = sqlx::query_as(
            "SELECT event_watermark, event_watermark_id FROM subscriptions WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(created, id)| created.map(|c| (c, id))))
    }

    async fn cancel_customer_subscriptions(
        &self,
        customer: &str,
        created: i64,
        event_id: &str,
    ) -> StoreResult<u64> {
        let now = Clock::now();
        let mut tx = begin_write(&self.pool).await?;
        let before =
            subscriptions_where(&mut tx, "stripe_customer_id = $1", customer, true).await?;
        let canceled = sqlx::query(&sql(
            "UPDATE subscriptions SET status = 'canceled', cancel_at_period_end = TRUE,
                    updated_at = {now},
                    event_watermark_id = CASE WHEN event_watermark IS NULL OR event_watermark <= $2
                                              THEN $3 ELSE event_watermark_id END,
                    event_watermark = {greatest}(COALESCE(event_watermark, $2), $2)
             WHERE stripe_customer_id = $1",
        ))
        .bind(customer)
        .bind(created)
        .bind(event_id)
        .clock(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let after =
            subscriptions_where(&mut tx, "stripe_customer_id = $1", customer, false).await?;
        // One customer's subscriptions belong to one user: their plan is computed once.
        let mut users = Vec::new();
        for after in &after {
            let before = before.iter().find(|b| b.id == after.id);
            if let Some(user) = announce_subscription_change(&mut tx, before, after, now).await? {
                if !users.contains(&user) {
                    users.push(user);
                }
            }
        }
        for user in users {
            announce_plan(&mut tx, &self.plans, user, now).await?;
        }
        tx.commit().await?;
        Ok(canceled)
    }
}
