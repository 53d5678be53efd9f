//! How SQLite writes what the shared statements leave open (see `store::sql`). Timestamps are
//! integer milliseconds from the application's clock, read once per operation so that one
//! transaction stamps one time; id lists go as JSON arrays (SQLite has no array binds).

use std::time::Duration;

use sqlx::{
    query::{Query, QueryAs, QueryScalar},
    sqlite::SqliteArguments,
    Sqlite, SqlitePool, Transaction,
};
use time::OffsetDateTime;

use crate::store::{
    sql::{self, Piece},
    StoreError, StoreResult,
};

pub(crate) type Db = Sqlite;
pub(crate) type Connection = sqlx::SqliteConnection;
pub(crate) const BACKEND: &str = "sqlite";

/// A timestamp as stored: milliseconds since the epoch.
pub(crate) type Time = i64;

pub(crate) fn time(ms: Time) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

pub(crate) fn db_time(at: OffsetDateTime) -> Time {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

/// A duration as `{later $N}` takes it: milliseconds.
pub(crate) fn span(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Ids as `{in $N}` takes them: a JSON array.
pub(crate) fn ids(ids: &[String]) -> String {
    serde_json::Value::from(ids).to_string()
}

/// The application's clock, read once: the statement's clock parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(pub(crate) Time);

impl Clock {
    pub(crate) fn now() -> Self {
        Self(db_time(crate::store::now()))
    }
}

/// Binds the clock parameter; it comes after every other one (see `store::sql`).
pub(crate) trait Clocked {
    fn clock(self, now: Clock) -> Self;
}

impl<'q> Clocked for Query<'q, Sqlite, SqliteArguments<'q>> {
    fn clock(self, now: Clock) -> Self {
        self.bind(now.0)
    }
}

impl<'q, O> Clocked for QueryAs<'q, Sqlite, O, SqliteArguments<'q>> {
    fn clock(self, now: Clock) -> Self {
        self.bind(now.0)
    }
}

impl<'q, O> Clocked for QueryScalar<'q, Sqlite, O, SqliteArguments<'q>> {
    fn clock(self, now: Clock) -> Self {
        self.bind(now.0)
    }
}

pub(crate) fn sql(text: &str) -> String {
    sql::render(text, |piece, clock| match piece {
        Piece::Now | Piece::NowMs => clock.into(),
        Piece::Later(ms) => format!("({clock} + {ms})"),
        Piece::In(ids) => format!("IN (SELECT value FROM json_each({ids}))"),
        Piece::Seq => "seq".into(),
        Piece::Greatest => "MAX".into(),
        Piece::Least => "MIN".into(),
        Piece::ForUpdate => String::new(),
        Piece::NewToken => "lower(hex(randomblob(16)))".into(),
    })
}

/// The erasure gate (see Postgres's): nothing to take here, as `BEGIN IMMEDIATE` already
/// serialises every writing transaction.
pub(crate) async fn erasure_gate(_: &mut Connection, _exclusive: bool) -> StoreResult<()> {
    Ok(())
}

/// `BEGIN IMMEDIATE`: the write lock from the start, so no transaction ever upgrades a read
/// lock (which SQLite answers with SQLITE_BUSY at once, busy timeout or not).
pub(crate) async fn begin_write(pool: &SqlitePool) -> sqlx::Result<Transaction<'static, Sqlite>> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

pub(crate) fn migrator() -> sqlx::migrate::Migrator {
    crate::store::migrations::sqlite_migrator()
}
