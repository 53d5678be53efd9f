//! Statements written once for both backends. Both take `$1`..`$N` placeholders (sqlx binds
//! SQLite's `$N` by its number, like Postgres; `tests::sqlite_binds_dollar_placeholders_by_number`
//! holds it to that); what still differs is written as a `{piece}` that each dialect renders:
//!
//! | piece | Postgres | SQLite |
//! | --- | --- | --- |
//! | `{now}` | `now()`: the database clock, one per transaction | the clock parameter |
//! | `{now_ms}` | `now()` truncated to milliseconds | the clock parameter |
//! | `{later $N}` | `now()` plus `$N` seconds | the clock parameter plus `$N` milliseconds |
//! | `{in $N}` | `= ANY($N)` (a text array) | `IN` the elements of `$N` (a JSON array) |
//! | `{seq}` | `arrival_seq` | `seq` |
//! | `{greatest}` | `GREATEST` | `MAX` |
//! | `{least}` | `LEAST` | `MIN` (of two or more arguments) |
//! | `{for_update}` | `FOR UPDATE OF u` (row lock) | nothing (`BEGIN IMMEDIATE` locks the file) |
//! | `{new_token}` | a random UUID | 128 random bits in hex |
//!
//! A few pieces read the same on both and only keep repeated text short: `{user_columns}`
//! (and `_qualified`), `{link_columns}`, `{job_columns}`, `{event_columns}`, `{user_changed}`
//! (the stored profile differs from `$2`..`$6`), `{user_differs_from_excluded}` (from a batch's
//! row named `excluded`), `{user_replaced}` (an upsert's `SET`: the profile from `excluded`, the
//! version one up) and `{superseded}` (another job makes this one redundant).
//!
//! SQLite's clock parameter is numbered one past the statement's last placeholder, and bound
//! last (`Clocked::clock`); on Postgres binding it does nothing. Anything else in braces (a
//! JSON literal `'{}'`) is left as it is.

/// A piece of a statement that the dialects write differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    Now,
    NowMs,
    Later(&'a str),
    In(&'a str),
    Seq,
    Greatest,
    Least,
    ForUpdate,
    NewToken,
}

impl<'a> Piece<'a> {
    fn parse(inner: &'a str) -> Option<Self> {
        let (name, param) = match inner.split_once(' ') {
            Some((name, param)) if param.starts_with('$') => (name, Some(param)),
            Some(_) => return None,
            None => (inner, None),
        };
        Some(match (name, param) {
            ("now", None) => Self::Now,
            ("now_ms", None) => Self::NowMs,
            ("later", Some(param)) => Self::Later(param),
            ("in", Some(param)) => Self::In(param),
            ("seq", None) => Self::Seq,
            ("greatest", None) => Self::Greatest,
            ("least", None) => Self::Least,
            ("for_update", None) => Self::ForUpdate,
            ("new_token", None) => Self::NewToken,
            _ => return None,
        })
    }
}

/// Pieces both dialects write alike.
fn common(name: &str) -> Option<&'static str> {
    Some(match name {
        "user_columns" => {
            "id, email, email_verified, first_name, last_name, phone, version, created_at, \
             updated_at, email_as_given"
        }
        "user_columns_qualified" => {
            "users.id, users.email, users.email_verified, users.first_name, users.last_name, \
             users.phone, users.version, users.created_at, users.updated_at, users.email_as_given"
        }
        "link_columns" => "user_id, stripe_customer_id, livemode, linked_via, linked_at",
        "job_columns" => {
            "id, kind, user_id, payload, state, attempts, last_error, claim_token, \
             next_attempt_at, created_at, updated_at"
        }
        "event_columns" => {
            "id, type, created, livemode, stripe_customer_id, state, attempts, last_error, \
             received_at"
        }
        "user_replaced" => {
            "email = excluded.email, email_as_given = excluded.email_as_given, \
             email_verified = excluded.email_verified, first_name = excluded.first_name, \
             last_name = excluded.last_name, phone = excluded.phone, \
             version = users.version + 1, updated_at = excluded.updated_at"
        }
        "user_changed" => {
            "(users.email IS DISTINCT FROM $2 OR users.email_verified IS DISTINCT FROM $3 \
             OR users.first_name IS DISTINCT FROM $4 OR users.last_name IS DISTINCT FROM $5 \
             OR users.phone IS DISTINCT FROM $6)"
        }
        "user_differs_from_excluded" => {
            "(users.email, users.email_verified, users.first_name, users.last_name, users.phone) \
             IS DISTINCT FROM (excluded.email, excluded.email_verified, excluded.first_name, \
             excluded.last_name, excluded.phone)"
        }
        "superseded" => {
            "EXISTS (SELECT 1 FROM outbox other WHERE other.user_id = outbox.user_id \
             AND other.kind = outbox.kind AND other.id <> outbox.id \
             AND (other.state = 'pending' OR (other.kind = 'erase' AND other.state = 'in_flight')))"
        }
        _ => return None,
    })
}

/// The statement with each piece written by `dialect`, which is also given the clock
/// parameter (`$` and one past the highest placeholder).
pub(crate) fn render(text: &str, dialect: impl Fn(Piece<'_>, &str) -> String) -> String {
    let text = expand(text, |name| common(name).map(str::to_owned));
    let clock = format!("${}", highest_placeholder(&text) + 1);
    expand(&text, |inner| Some(dialect(Piece::parse(inner)?, &clock)))
}

/// `text` with each `{inner}` that `piece` knows replaced by what it says.
fn expand(text: &str, piece: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after
            .find('}')
            .and_then(|close| Some((piece(&after[..close])?, close)))
        {
            Some((written, close)) => {
                out.push_str(&written);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn highest_placeholder(text: &str) -> usize {
    text.split('$')
        .skip(1)
        .filter_map(|after| {
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            after[..digits].parse::<usize>().ok()
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(piece: Piece<'_>, clock: &str) -> String {
        match piece {
            Piece::Now | Piece::NowMs => clock.to_owned(),
            Piece::Later(param) => format!("({clock} + {param})"),
            other => format!("<{other:?}>"),
        }
    }

    #[test]
    fn pieces_are_rendered_and_the_clock_follows_the_last_placeholder() {
        assert_eq!(
            render(
                "UPDATE t SET a = $2, at = {now}, due = {later $12} WHERE id = $1",
                sqlite
            ),
            "UPDATE t SET a = $2, at = $13, due = ($13 + $12) WHERE id = $1"
        );
        assert_eq!(render("SELECT {now_ms}", sqlite), "SELECT $1");
        assert!(render("WHERE {user_changed} AND x = {now}", sqlite).ends_with("x = $7"));
    }

    #[test]
    fn other_braces_are_left_alone() {
        let text = "INSERT INTO t VALUES ('{}', '{\"a\": 1}', '{later x}', '{nope}') -- {";
        assert_eq!(render(text, sqlite), text);
    }

    /// sqlx-sqlite binds `$N` to the N-th argument, whatever the order the placeholders
    /// appear in, as Postgres does; the shared statements rely on it.
    #[tokio::test]
    async fn sqlite_binds_dollar_placeholders_by_number() {
        use sqlx::Connection;
        let mut db = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        let row: (String, String, String, i64) = sqlx::query_as("SELECT $3, $1, $3, $2")
            .bind("one")
            .bind(2_i64)
            .bind("three")
            .fetch_one(&mut db)
            .await
            .unwrap();
        assert_eq!(row, ("three".into(), "one".into(), "three".into(), 2));
    }
}
