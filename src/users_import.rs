//! Bulk user import: the rows of a file (`billsync users import`) or of a request
//! (`POST /v1/users/batch`), each checked as `PUT /v1/users/{id}` checks one user and written
//! as it writes one (a change queues a push and `user.updated`), a batch per transaction. An
//! invalid row is reported and skipped; the others are imported. An erased person is never
//! brought back.

use std::{io::BufRead, time::Duration};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    domain::{ImportOutcome, UserId, UserImport, UserUpsert, ValidationError},
    gdpr::Tombstones,
    retry::RetryPolicy,
    store::{Store, StoreError},
};

/// Rows written per transaction by the command, and the most a batch request may carry.
pub const BATCH_SIZE: usize = 1000;

/// The fields a row may have: those of `PUT /v1/users/{id}`'s body, and the id.
const FIELDS: [&str; 6] = [
    "id",
    "email",
    "email_verified",
    "first_name",
    "last_name",
    "phone",
];

/// A row's longest line in a JSON Lines file; a longer one is reported, not buffered.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// Why a row was not imported: a code and a message as the API gives them, neither of which
/// repeats the row's values (they may be personal data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RowError {
    pub code: &'static str,
    pub message: String,
}

impl RowError {
    fn shape(message: impl Into<String>) -> Self {
        Self {
            code: "invalid_request",
            message: message.into(),
        }
    }
}

impl From<ValidationError> for RowError {
    fn from(err: ValidationError) -> Self {
        Self {
            code: err.code,
            message: err.message,
        }
    }
}

/// A row's fields before they are checked.
#[derive(Debug, Default)]
struct RawUser {
    id: Option<String>,
    email: Option<String>,
    email_verified: bool,
    first_name: Option<String>,
    last_name: Option<String>,
    phone: Option<String>,
}

impl RawUser {
    fn set(&mut self, field: &str, value: Option<String>) {
        match field {
            "id" => self.id = value,
            "email" => self.email = value,
            "first_name" => self.first_name = value,
            "last_name" => self.last_name = value,
            "phone" => self.phone = value,
            _ => unreachable!("only FIELDS are set"),
        }
    }

    fn into_upsert(self) -> Result<UserUpsert, RowError> {
        let id = self
            .id
            .ok_or_else(|| RowError::shape("missing field `id`"))?;
        let email = self
            .email
            .ok_or_else(|| RowError::shape("missing field `email`"))?;
        Ok(UserUpsert::parse(
            UserId::parse(&id)?,
            &email,
            self.email_verified,
            self.first_name.as_deref(),
            self.last_name.as_deref(),
            self.phone.as_deref(),
        )?)
    }
}

/// One user as a JSON object with the fields of `PUT /v1/users/{id}` and `id`.
pub fn user_from_json(value: &Value) -> Result<UserUpsert, RowError> {
    let Value::Object(fields) = value else {
        return Err(RowError::shape("a user must be a JSON object"));
    };
    raw_from_object(fields)?.into_upsert()
}

/// The id of a row that names one, for reporting a row that is otherwise invalid.
pub fn id_of(value: &Value) -> Option<&str> {
    value.get("id").and_then(Value::as_str)
}

fn raw_from_object(fields: &Map<String, Value>) -> Result<RawUser, RowError> {
    let mut raw = RawUser::default();
    for (name, value) in fields {
        match (name.as_str(), value) {
            ("email_verified", Value::Bool(b)) => raw.email_verified = *b,
            ("email_verified", Value::Null) => raw.email_verified = false,
            ("email_verified", _) => {
                return Err(RowError::shape("`email_verified` must be true or false"))
            }
            (field, Value::String(s)) if FIELDS.contains(&field) => raw.set(field, Some(s.clone())),
            (field, Value::Null) if FIELDS.contains(&field) => raw.set(field, None),
            (field, _) if FIELDS.contains(&field) => {
                return Err(RowError::shape(format!("`{field}` must be a string")))
            }
            (other, _) => {
                return Err(RowError::shape(format!(
                    "unknown field `{}`; a user has {}",
                    printable(other),
                    FIELDS.join(", ")
                )))
            }
        }
    }
    Ok(raw)
}

/// A field name from the input, cut short and stripped of control characters for a report.
fn printable(name: &str) -> String {
    name.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// The formats `users import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object a line.
    Jsonl,
    /// A header line naming the columns, then one user a line.
    Csv,
}

impl Format {
    /// The format a file name says: `.jsonl`/`.ndjson`, or `.csv`.
    pub fn of_path(path: &std::path::Path) -> Option<Self> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "jsonl" | "ndjson" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            _ => None,
        }
    }
}

/// A row of the file: its line number (the first line is 1) and the user, or why not.
#[derive(Debug)]
pub struct Row {
    pub line: u64,
    pub user: Result<UserUpsert, RowError>,
}

/// What stops the reading of a whole file (as opposed to one row).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("the CSV header {0}")]
    Header(String),
    #[error("line {line}: {message}")]
    Csv { line: u64, message: String },
}

/// The rows of a file, read one at a time (memory does not grow with the file).
pub struct Rows<R: BufRead> {
    source: Source<R>,
    /// Bytes consumed so far, for progress.
    bytes: u64,
}

enum Source<R: BufRead> {
    Jsonl {
        reader: R,
        line: u64,
        buffer: Vec<u8>,
    },
    Csv {
        reader: csv::Reader<R>,
        /// For each column, the field it holds.
        columns: Vec<&'static str>,
        record: csv::StringRecord,
    },
}

impl<R: BufRead> Rows<R> {
    pub fn new(reader: R, format: Format) -> Result<Self, FileError> {
        let source = match format {
            Format::Jsonl => Source::Jsonl {
                reader,
                line: 0,
                buffer: Vec::new(),
            },
            Format::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .flexible(true)
                    .from_reader(reader);
                let header = reader
                    .headers()
                    .map_err(|e| FileError::Header(e.to_string()))?;
                Source::Csv {
                    columns: csv_columns(header)?,
                    reader,
                    record: csv::StringRecord::new(),
                }
            }
        };
        Ok(Self { source, bytes: 0 })
    }

    /// Bytes of the file read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    fn next_row(&mut self) -> Result<Option<Row>, FileError> {
        match &mut self.source {
            Source::Jsonl {
                reader,
                line,
                buffer,
            } => loop {
                buffer.clear();
                let read = read_line(reader, buffer)?;
                if read == 0 {
                    return Ok(None);
                }
                self.bytes += read as u64;
                *line += 1;
                if read > MAX_LINE_BYTES {
                    return Ok(Some(Row {
                        line: *line,
                        user: Err(RowError::shape(format!(
                            "the line is longer than {MAX_LINE_BYTES} bytes"
                        ))),
                    }));
                }
                // A byte-order mark (a spreadsheet's export) is not part of the first row.
                let text = buffer
                    .strip_prefix(b"\xef\xbb\xbf")
                    .unwrap_or(buffer)
                    .trim_ascii();
                if text.is_empty() {
                    continue;
                }
                return Ok(Some(Row {
                    line: *line,
                    user: json_row(text),
                }));
            },
            Source::Csv {
                reader,
                columns,
                record,
            } => {
                let more = reader.read_record(record).map_err(|e| FileError::Csv {
                    line: e.position().map_or(0, csv::Position::line),
                    message: csv_error_kind(&e),
                })?;
                if !more {
                    return Ok(None);
                }
                let position = record.position().expect("a read record has a position");
                self.bytes = position.byte();
                Ok(Some(Row {
                    line: position.line(),
                    user: csv_row(columns, record),
                }))
            }
        }
    }
}

impl<R: BufRead> Iterator for Rows<R> {
    type Item = Result<Row, FileError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_row().transpose()
    }
}

/// Reads one line into `buffer` (keeping at most `MAX_LINE_BYTES` + 1 of it); returns how many
/// bytes the line had, its newline included.
fn read_line(reader: &mut impl BufRead, buffer: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(total);
        }
        let (chunk, done) = match memchr_newline(available) {
            Some(at) => (&available[..=at], true),
            None => (available, false),
        };
        let room = (MAX_LINE_BYTES + 1).saturating_sub(buffer.len());
        buffer.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len();
        total += used;
        reader.consume(used);
        if done {
            return Ok(total);
        }
    }
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

fn json_row(text: &[u8]) -> Result<UserUpsert, RowError> {
    let value: Value = serde_json::from_slice(text).map_err(|e| RowError {
        code: "invalid_json",
        // The position only: serde_json's message may quote the input.
        message: format!("not valid JSON (column {})", e.column()),
    })?;
    user_from_json(&value)
}

fn csv_columns(header: &csv::StringRecord) -> Result<Vec<&'static str>, FileError> {
    let mut columns = Vec::with_capacity(header.len());
    for name in header {
        let name = name.trim().trim_start_matches('\u{feff}');
        let field = FIELDS.iter().find(|f| **f == name).ok_or_else(|| {
            // A file without a header would have its first row here: a name is shown only
            // when it looks like one (letters and underscores), never an address or an id.
            let looks_like_a_name = !name.is_empty()
                && name.len() <= 40
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphabetic() || c == '_' || c == ' ');
            let column = if looks_like_a_name {
                format!("`{name}`")
            } else {
                format!("number {}", columns.len() + 1)
            };
            FileError::Header(format!(
                "names a column {column} that a user does not have (is the first line a \
                 header?); the columns are {}",
                FIELDS.join(", ")
            ))
        })?;
        if columns.contains(field) {
            return Err(FileError::Header(format!("names `{field}` twice")));
        }
        columns.push(*field);
    }
    for required in ["id", "email"] {
        if !columns.contains(&required) {
            return Err(FileError::Header(format!("has no `{required}` column")));
        }
    }
    Ok(columns)
}

fn csv_row(columns: &[&'static str], record: &csv::StringRecord) -> Result<UserUpsert, RowError> {
    if record.len() != columns.len() {
        return Err(RowError::shape(format!(
            "{} fields where the header names {}",
            record.len(),
            columns.len()
        )));
    }
    let mut raw = RawUser::default();
    for (field, value) in columns.iter().zip(record.iter()) {
        if *field == "email_verified" {
            raw.email_verified = parse_flag(value)?;
        } else {
            // An empty cell is an absent value, as `null` is in JSON.
            raw.set(field, (!value.is_empty()).then(|| value.to_owned()));
        }
    }
    raw.into_upsert()
}

/// `email_verified` in a CSV cell: what spreadsheets and `COPY … CSV` write for a boolean.
fn parse_flag(value: &str) -> Result<bool, RowError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "false" | "f" | "0" | "no" => Ok(false),
        "true" | "t" | "1" | "yes" => Ok(true),
        _ => Err(RowError::shape(
            "`email_verified` must be true or false (or t/f, 1/0, yes/no)",
        )),
    }
}

/// A CSV error's kind, without the record's contents.
fn csv_error_kind(err: &csv::Error) -> String {
    match err.kind() {
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".into(),
        csv::ErrorKind::Io(e) => format!("cannot read the file: {e}"),
        _ => "not valid CSV".into(),
    }
}

/// How many rows each outcome had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Summary {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Erased earlier and without an account since: not brought back.
    pub erased: u64,
    pub invalid: u64,
}

impl Summary {
    pub fn count(&mut self, outcome: &ImportOutcome) {
        match outcome {
            ImportOutcome::Created(_) => self.created += 1,
            ImportOutcome::Updated(_) => self.updated += 1,
            ImportOutcome::Unchanged(_) => self.unchanged += 1,
            ImportOutcome::Erased => self.erased += 1,
        }
    }

    pub fn rows(&self) -> u64 {
        self.created + self.updated + self.unchanged + self.erased + self.invalid
    }

    /// Whether the import wrote anything.
    pub fn changed_anything(&self) -> bool {
        self.created + self.updated > 0
    }
}

/// Attempts of one batch, and the waits between them. A deadlock with another writer (the
/// webhook applier's batch locks users too, in its own order) or a lost connection is worth
/// another try: the attempt's transaction wrote nothing. (A batch with a repeated id is several
/// transactions; a retry then finds the first ones' rows as written, unchanged.)
const BATCH_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    backoff_base: Duration::from_millis(800),
    backoff_max: Duration::from_millis(1600),
};

/// Writes valid users, in order (a repeated id: the later row wins); the outcomes in the
/// order of `users`.
pub async fn import(
    store: &dyn Store,
    tombstones: &Tombstones,
    users: Vec<UserUpsert>,
) -> Result<Vec<ImportOutcome>, StoreError> {
    let mut imports = Vec::with_capacity(users.len());
    for user in users {
        let subject = tombstones.subject(store, &user.id).await?;
        imports.push(UserImport { user, subject });
    }
    let mut attempt = 1;
    loop {
        match store.import_users(&imports).await {
            // Only an unavailable database: any other store error would fail again.
            Err(StoreError::Unavailable(err)) if attempt < BATCH_RETRY.max_attempts => {
                tracing::warn!(attempt, error = %err, "an import batch failed; trying it again");
                tokio::time::sleep(BATCH_RETRY.backoff(attempt, None)).await;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(text: &str, format: Format) -> Vec<(u64, Result<String, RowError>)> {
        Rows::new(text.as_bytes(), format)
            .unwrap()
            .map(|row| {
                let row = row.unwrap();
                (row.line, row.user.map(|u| u.id.to_string()))
            })
            .collect()
    }

    fn code(err: &RowError) -> &'static str {
        err.code
    }

    #[test]
    fn a_json_user_is_checked_as_the_admin_put_checks_one() {
        let user = user_from_json(&json!({
            "id": "u1", "email": " Ada@Example.com ", "email_verified": true,
            "first_name": "Ada", "last_name": null, "phone": ""
        }))
        .unwrap();
        assert_eq!(user.email.as_str(), "ada@example.com");
        assert_eq!(user.email.as_given(), Some("Ada@Example.com"));
        assert!(user.email_verified);
        assert_eq!((user.last_name, user.phone), (None, None));
        let invalid = |value: Value| user_from_json(&value).unwrap_err();
        assert_eq!(
            invalid(json!({"id": "u1", "email": "nope"})).code,
            "invalid_email"
        );
        assert_eq!(
            invalid(json!({"id": "u1", "email": "a@b.co", "phone": "12"})).code,
            "invalid_phone"
        );
        assert_eq!(
            invalid(json!({"id": " u1", "email": "a@b.co"})).code,
            "invalid_user_id"
        );
        assert_eq!(
            invalid(json!({"email": "a@b.co"})).message,
            "missing field `id`"
        );
        assert_eq!(
            invalid(json!({"id": "u1"})).message,
            "missing field `email`"
        );
        assert_eq!(invalid(json!(["u1"])).code, "invalid_request");
        let unknown = invalid(json!({"id": "u1", "email": "a@b.co", "plan": "pro"}));
        assert!(
            unknown.message.starts_with("unknown field `plan`"),
            "{unknown:?}"
        );
        let typed = invalid(json!({"id": "u1", "email": "a@b.co", "email_verified": "yes"}));
        assert_eq!(typed.message, "`email_verified` must be true or false");
        assert_eq!(
            invalid(json!({"id": 7, "email": "a@b.co"})).message,
            "`id` must be a string"
        );
    }

    #[test]
    fn no_report_repeats_a_value_of_the_row() {
        let secret = "ada.lovelace.private";
        for value in [
            json!({"id": "u1", "email": secret}),
            json!({"id": "u1", "email": "a@b.co", "phone": secret}),
            json!({"id": "u1", "email": "a@b.co", "email_verified": secret}),
            json!({"id": "u1", "email": ["a", secret]}),
        ] {
            let err = user_from_json(&value).unwrap_err();
            assert!(!err.message.contains(secret), "{err:?}");
        }
        let bad_json = format!("{{\"id\": \"u1\", \"email\": {secret}}}\n");
        let (_, row) = &rows(&bad_json, Format::Jsonl)[0];
        let err = row.as_ref().unwrap_err();
        assert_eq!(err.code, "invalid_json");
        assert!(!err.message.contains(secret), "{err:?}");
    }

    #[test]
    fn json_lines_are_numbered_from_one_and_blank_lines_skipped() {
        let text = "{\"id\": \"u1\", \"email\": \"a@b.co\"}\n\n  \n{\"id\": \"u2\", \"email\": \"x\"}\r\n{\"id\": \"u3\", \"email\": \"c@d.co\"}";
        let read = rows(text, Format::Jsonl);
        assert_eq!(read.len(), 3);
        assert_eq!(read[0], (1, Ok("u1".into())));
        assert_eq!(
            (read[1].0, read[1].1.as_ref().map_err(code)),
            (4, Err("invalid_email"))
        );
        assert_eq!(read[2], (5, Ok("u3".into())));
    }

    #[test]
    fn an_overlong_json_line_is_one_invalid_row_and_reading_goes_on() {
        let long = format!(
            "{{\"id\": \"u1\", \"email\": \"a@b.co\", \"first_name\": \"{}\"}}\n{{\"id\": \"u2\", \"email\": \"c@d.co\"}}\n",
            "x".repeat(MAX_LINE_BYTES)
        );
        let read = rows(&long, Format::Jsonl);
        assert_eq!(read.len(), 2);
        assert!(read[0]
            .1
            .as_ref()
            .unwrap_err()
            .message
            .contains("longer than"));
        assert_eq!(read[1], (2, Ok("u2".into())));
    }

    #[test]
    fn csv_columns_in_any_order_empty_cells_absent_and_flags_as_databases_write_them() {
        let text = "email,id,email_verified,phone\n\
                    a@b.co,u1,t,\n\
                    \"c@d.co\",u2,FALSE,+4915112345678\n\
                    e@f.co,u3,maybe,\n\
                    g@h.co,u4\n";
        let mut read = Rows::new(text.as_bytes(), Format::Csv).unwrap();
        let first = read.next().unwrap().unwrap();
        assert_eq!(first.line, 2);
        let first = first.user.unwrap();
        assert!(first.email_verified);
        assert_eq!(first.phone, None);
        let second = read.next().unwrap().unwrap().user.unwrap();
        assert!(!second.email_verified);
        assert_eq!(second.phone.unwrap().as_str(), "+4915112345678");
        let third = read.next().unwrap().unwrap();
        assert_eq!(third.line, 4);
        assert!(third.user.unwrap_err().message.contains("email_verified"));
        let fourth = read.next().unwrap().unwrap();
        assert!(fourth
            .user
            .unwrap_err()
            .message
            .contains("2 fields where the header names 4"));
        assert!(read.next().is_none());
        assert_eq!(read.bytes_read() as usize, text.len() - "g@h.co,u4\n".len());
    }

    #[test]
    fn a_csv_header_must_name_known_columns_with_id_and_email() {
        let header = |text: &str| match Rows::new(text.as_bytes(), Format::Csv) {
            Err(FileError::Header(message)) => message,
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("accepted {text:?}"),
        };
        assert!(header("id,email,plan\n").contains("`plan`"));
        // No header: the first row's values are not repeated.
        let headless = header("u1,ada@example.com,Ada\n");
        assert!(headless.contains("column number 1"), "{headless}");
        assert!(
            !headless.contains("u1") && !headless.contains("ada@"),
            "{headless}"
        );
        assert!(header("id,first_name\n").contains("no `email`"));
        assert!(header("id,email,id\n").contains("`id` twice"));
        // A spreadsheet's byte-order mark is not part of the first column's name.
        assert!(Rows::new("\u{feff}id,email\nu1,a@b.co\n".as_bytes(), Format::Csv).is_ok());
    }

    #[test]
    fn formats_by_extension() {
        let of = |name: &str| Format::of_path(std::path::Path::new(name));
        assert_eq!(of("users.jsonl"), Some(Format::Jsonl));
        assert_eq!(of("users.NDJSON"), Some(Format::Jsonl));
        assert_eq!(of("export.csv"), Some(Format::Csv));
        assert_eq!(of("users.json"), None);
        assert_eq!(of("-"), None);
    }
}
