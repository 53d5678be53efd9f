-- An erased person stays erased (issue 12 §6): a keyed hash (HMAC-SHA256 with a server-side
-- pepper) of each erased user id and when it was erased. Tokens issued before that are refused.
CREATE TABLE erasure_tombstones (
    subject   TEXT PRIMARY KEY,
    erased_at TIMESTAMPTZ NOT NULL
);

-- billsync's own settings kept in the database: the generated tombstone pepper when
-- BILLSYNC_ERASURE_PEPPER is not set.
CREATE TABLE billsync_settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
