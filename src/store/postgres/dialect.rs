//! How Postgres writes what the shared statements leave open (see `store::sql`). Timestamps
//! are TIMESTAMPTZ and come from the database clock, so instances with skewed clocks agree.

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;

use crate::store::{
    sql::{self, Piece},
    StoreResult,
};

pub(crate) type Db = Postgres;
pub(crate) type Connection = sqlx::PgConnection;
pub(crate) const BACKEND: &str = "postgres";

/// A timestamp as stored.
pub(crate) type Time = OffsetDateTime;

pub(crate) fn time(at: Time) -> StoreResult<OffsetDateTime> {
    Ok(at)
}

pub(crate) fn db_time(at: OffsetDateTime) -> Time {
    at
}

/// A duration as `{later $N}` takes it: seconds.
pub(crate) fn span(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// Ids as `{in $N}` takes them: a text array.
pub(crate) fn ids(ids: &[String]) -> &[String] {
    ids
}

/// The database's clock: `now()` in the statement, nothing to bind.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock;

impl Clock {
    pub(crate) fn now() -> Self {
        Self
    }
}

pub(crate) trait Clocked: Sized {
    fn clock(self, _: Clock) -> Self {
        self
    }
}

impl<T> Clocked for T {}

pub(crate) fn sql(text: &str) -> String {
    sql::render(text, |piece, _| match piece {
        Piece::Now => "now()".into(),
        Piece::NowMs => "date_trunc('milliseconds', now())".into(),
        Piece::Later(secs) => format!("(now() + make_interval(secs => {secs}))"),
        Piece::In(ids) => format!("= ANY({ids})"),
        Piece::Seq => "arrival_seq".into(),
        Piece::Greatest => "GREATEST".into(),
        Piece::Least => "LEAST".into(),
        Piece::ForUpdate => "FOR UPDATE OF u".into(),
        Piece::NewToken => "gen_random_uuid()::text".into(),
    })
}

/// The key of the erasure gate (`pg_advisory_xact_lock(int4, int4)`, second key 0): "eras".
const ERASURE_GATE: i32 = 0x6572_6173;

/// The erasure gate, held until the transaction ends: an import batch holds it shared, the
/// writing of a tombstone exclusively. So no tombstone commits while a batch that may not see
/// it is creating users (the batch finishes first, and the erasure then deletes what it
/// wrote), and a batch that starts after one reads it. Imports do not wait for each other.
pub(crate) async fn erasure_gate(db: &mut Connection, exclusive: bool) -> StoreResult<()> {
    let statement = if exclusive {
        "SELECT pg_advisory_xact_lock($1, 0)"
    } else {
        "SELECT pg_advisory_xact_lock_shared($1, 0)"
    };
    sqlx::query(statement)
        .bind(ERASURE_GATE)
        .execute(db)
        .await?;
    Ok(())
}

/// A transaction for a read-modify-write; row locks (`{for_update}`) do the rest.
pub(crate) async fn begin_write(pool: &PgPool) -> sqlx::Result<Transaction<'static, Postgres>> {
    pool.begin().await
}

pub(crate) fn migrator() -> sqlx::migrate::Migrator {
    crate::store::migrations::postgres_migrator()
}
