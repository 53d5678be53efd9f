-- billsync schema, SQLite. Timestamps are INTEGER unix milliseconds (UTC), so they compare
-- correctly; Stripe's own `created` stays unix seconds.

CREATE TABLE users (
    id             TEXT PRIMARY KEY,
    email          TEXT NOT NULL,
    email_verified INTEGER NOT NULL DEFAULT 0,
    first_name     TEXT,
    last_name      TEXT,
    phone          TEXT,
    -- increases on every local profile change; the echo rules compare against it
    version        INTEGER NOT NULL DEFAULT 1,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX users_email_idx ON users (email);

CREATE TABLE customer_links (
    user_id            TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    stripe_customer_id TEXT NOT NULL UNIQUE,
    livemode           INTEGER NOT NULL,
    linked_via         TEXT NOT NULL
        CHECK (linked_via IN ('existing', 'stripe_metadata', 'stripe_email', 'created')),
    linked_at          INTEGER NOT NULL,
    -- `created` and id of the newest Stripe event applied to this customer
    event_watermark    INTEGER,
    event_watermark_id TEXT,
    -- what billsync last pushed to the customer, to recognise its echo in customer.updated
    pushed_email       TEXT,
    pushed_name        TEXT,
    pushed_phone       TEXT,
    pushed_version     INTEGER,
    pushed_at          INTEGER
);

-- A per-user claim on customer creation, so two instances never both create a customer.
-- `started_at` and `create_params` survive a failed attempt: they fix the create request and
-- its idempotency key, so a retry after a crash (even after a profile edit) replays the very
-- same request and Stripe answers with the customer it already made.
CREATE TABLE customer_resolve_claims (
    user_id     TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    holder      TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    lease_until INTEGER NOT NULL,
    -- the exact form of the first create attempt (JSON)
    create_params TEXT
);

CREATE TABLE subscriptions (
    id                   TEXT PRIMARY KEY,
    user_id              TEXT REFERENCES users (id) ON DELETE CASCADE,
    stripe_customer_id   TEXT NOT NULL,
    status               TEXT NOT NULL,
    price_id             TEXT,
    cancel_at_period_end INTEGER NOT NULL DEFAULT 0,
    current_period_end   INTEGER,
    event_watermark      INTEGER,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);
CREATE INDEX subscriptions_user_idx ON subscriptions (user_id);
CREATE INDEX subscriptions_customer_idx ON subscriptions (stripe_customer_id);

CREATE TABLE usage_records (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    metric      TEXT NOT NULL,
    quantity    INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX usage_records_user_idx ON usage_records (user_id, created_at);

-- Inbox of verified Stripe webhook events; `seq` is the arrival order (AUTOINCREMENT: never
-- reused, unlike a rowid after deletes or VACUUM).
CREATE TABLE stripe_events (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    id                 TEXT NOT NULL UNIQUE,
    type               TEXT NOT NULL,
    created            INTEGER NOT NULL,
    livemode           INTEGER NOT NULL,
    stripe_customer_id TEXT,
    payload            TEXT NOT NULL,
    received_at        INTEGER NOT NULL,
    state              TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'applied', 'skipped', 'failed')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    INTEGER,
    last_error         TEXT,
    applied_at         INTEGER
);
CREATE INDEX stripe_events_pending_idx
    ON stripe_events (stripe_customer_id, created, seq) WHERE state IN ('pending', 'failed');
CREATE INDEX stripe_events_state_idx ON stripe_events (state, received_at);

-- Which applier works on a customer's events right now (per-customer order across instances).
CREATE TABLE event_customer_leases (
    stripe_customer_id TEXT PRIMARY KEY,
    holder             TEXT NOT NULL,
    lease_until        INTEGER NOT NULL
);

-- Durable jobs towards Stripe.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL CHECK (kind IN ('push_profile', 'erase')),
    user_id         TEXT NOT NULL,
    payload         TEXT NOT NULL DEFAULT '{}',
    state           TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'in_flight', 'done', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    locked_until    INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
-- coalescing: at most one pending profile push per user
CREATE UNIQUE INDEX outbox_one_pending_push_idx
    ON outbox (user_id) WHERE kind = 'push_profile' AND state = 'pending';
-- an erasure runs once per user at a time
CREATE UNIQUE INDEX outbox_one_active_erase_idx
    ON outbox (user_id) WHERE kind = 'erase' AND state IN ('pending', 'in_flight');
CREATE INDEX outbox_due_idx ON outbox (next_attempt_at) WHERE state = 'pending';
CREATE INDEX outbox_user_idx ON outbox (user_id, state);

-- GDPR and admin actions; subject is a hash of the user id, never personal data.
CREATE TABLE audit_log (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    action       TEXT NOT NULL,
    subject_hash TEXT,
    detail       TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE portal_configurations (
    name                    TEXT PRIMARY KEY,
    stripe_configuration_id TEXT NOT NULL,
    spec_hash               TEXT NOT NULL,
    applied_at              INTEGER NOT NULL
);
