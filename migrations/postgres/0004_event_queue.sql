-- Work still to do on the inbox moves to a narrow table of its own. Applying an event used to
-- rewrite its whole ~1.5 KB row (`state = 'applied'`), and because the state sat in the partial
-- indexes' predicates that update could never be HOT: every event was written to the WAL twice,
-- with four index entries each time. Now applying deletes a ~100-byte queue row, and the event
-- row is written once, at ingest.
--
-- stripe_events.state is what ingest filed ('pending' for events to apply, 'skipped') and, for
-- an event that needed more than one attempt, 'applied' once it was. An event filed 'pending'
-- with no queue row is applied; `stripe_event_states` spells that out.
CREATE TABLE stripe_event_queue (
    event_id           TEXT PRIMARY KEY,
    stripe_customer_id TEXT NOT NULL,
    created            BIGINT NOT NULL,
    arrival_seq        BIGINT NOT NULL,
    received_at        TIMESTAMPTZ NOT NULL,
    state              TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'failed')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    TIMESTAMPTZ,
    last_error         TEXT
);
-- a customer's events in apply order
CREATE INDEX stripe_event_queue_customer_idx
    ON stripe_event_queue (stripe_customer_id, created, arrival_seq);
-- the applier picks customers from the oldest waiting events
CREATE INDEX stripe_event_queue_arrival_idx ON stripe_event_queue (arrival_seq);
-- failures are rare: their own small index keeps "due for a retry" cheap
CREATE INDEX stripe_event_queue_failed_idx ON stripe_event_queue (arrival_seq) WHERE state = 'failed';

-- A handled event without a customer never had anything to apply it to (no applier ever picked
-- it); it is filed as skipped now, and the constraint keeps it that way.
UPDATE stripe_events SET state = 'skipped'
    WHERE state IN ('pending', 'failed') AND stripe_customer_id IS NULL;
ALTER TABLE stripe_events
    ADD CONSTRAINT stripe_events_pending_has_customer
    CHECK (state NOT IN ('pending', 'failed') OR stripe_customer_id IS NOT NULL);

INSERT INTO stripe_event_queue (event_id, stripe_customer_id, created, arrival_seq, received_at,
                                state, attempts, next_attempt_at, last_error)
    SELECT id, stripe_customer_id, created, arrival_seq, received_at, state, attempts,
           next_attempt_at, last_error
    FROM stripe_events WHERE state IN ('pending', 'failed');

DROP INDEX stripe_events_pending_idx;
DROP INDEX stripe_events_due_idx;
DROP INDEX stripe_events_state_idx;
-- newest first for the admin list; BRIN for retention (received_at only grows with the table)
CREATE INDEX stripe_events_arrival_idx ON stripe_events (arrival_seq);
CREATE INDEX stripe_events_received_brin ON stripe_events USING brin (received_at);

-- Each event's effective state, for the admin API and for operators reading the database.
CREATE VIEW stripe_event_states AS
SELECT e.id, e.type, e.created, e.livemode, e.stripe_customer_id,
       COALESCE(q.state, CASE WHEN e.state = 'skipped' THEN 'skipped' ELSE 'applied' END) AS state,
       COALESCE(q.attempts, e.attempts) AS attempts,
       CASE WHEN q.event_id IS NULL THEN e.last_error ELSE q.last_error END AS last_error,
       e.received_at, e.arrival_seq, q.next_attempt_at
FROM stripe_events e LEFT JOIN stripe_event_queue q ON q.event_id = e.id;
