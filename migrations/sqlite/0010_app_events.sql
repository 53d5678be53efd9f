-- Events towards the app (issue 15): a transactional outbox, written in the same transaction as
-- the change it announces. `seq` is the insertion order; `position` is the total order readers
-- page by. Committed events get their positions from one sequencer at a time (it holds the
-- `app_event_sequencer` row, which also keeps the last position given, so positions only rise,
-- whatever retention deletes): a later position never becomes visible before an earlier one,
-- and a cursor over `position` never skips an event.
CREATE TABLE app_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    position INTEGER UNIQUE,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    -- Delivery is ordered per key: the user's id, or `erased:<subject>`.
    event_key TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    next_attempt_at INTEGER NOT NULL,
    delivered_at INTEGER,
    claim_token TEXT,
    locked_until INTEGER
);
CREATE INDEX app_events_unsequenced_idx ON app_events (seq) WHERE position IS NULL;
CREATE INDEX app_events_pending_idx ON app_events (position) WHERE state = 'pending';
CREATE INDEX app_events_key_idx ON app_events (event_key, position) WHERE state = 'pending';
-- Parked events, for the operator's listing (an index on all states would draw the
-- planner away from the key index the claim's grouping reads).
CREATE INDEX app_events_failed_idx ON app_events (seq) WHERE state = 'failed';
CREATE INDEX app_events_created_idx ON app_events (created_at);

CREATE TABLE app_event_sequencer (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_position INTEGER NOT NULL
);
INSERT INTO app_event_sequencer (id, last_position) VALUES (1, 0);

-- The plan last announced for each user (`plan.changed`); no row: the default plan.
CREATE TABLE user_plans (
    user_id TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    plan_id TEXT
);
