-- Work still to do on the inbox moves to a narrow table of its own: applying an event deletes a
-- small queue row instead of rewriting the ~1.5 KB event and its index entries (see the
-- Postgres migration of the same name). stripe_events.state is what ingest filed ('pending'
-- for events to apply, 'skipped') and, for an event that needed more than one attempt,
-- 'applied' once it was. An event filed 'pending' with no queue row is applied;
-- `stripe_event_states` spells that out.
CREATE TABLE stripe_event_queue (
    event_id           TEXT PRIMARY KEY,
    stripe_customer_id TEXT NOT NULL,
    created            INTEGER NOT NULL,
    seq                INTEGER NOT NULL,
    received_at        INTEGER NOT NULL,
    state              TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'failed')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    INTEGER,
    last_error         TEXT
) WITHOUT ROWID;
CREATE INDEX stripe_event_queue_customer_idx ON stripe_event_queue (stripe_customer_id, created, seq);
CREATE INDEX stripe_event_queue_seq_idx ON stripe_event_queue (seq);
CREATE INDEX stripe_event_queue_failed_idx ON stripe_event_queue (seq) WHERE state = 'failed';

-- A handled event without a customer never had anything to apply it to; filed as skipped.
UPDATE stripe_events SET state = 'skipped'
    WHERE state IN ('pending', 'failed') AND stripe_customer_id IS NULL;

INSERT INTO stripe_event_queue (event_id, stripe_customer_id, created, seq, received_at, state,
                                attempts, next_attempt_at, last_error)
    SELECT id, stripe_customer_id, created, seq, received_at, state, attempts, next_attempt_at,
           last_error
    FROM stripe_events WHERE state IN ('pending', 'failed');

DROP INDEX stripe_events_pending_idx;
DROP INDEX stripe_events_due_idx;
DROP INDEX stripe_events_state_idx;
-- retention deletes by age (the admin list walks `seq`, the rowid)
CREATE INDEX stripe_events_received_idx ON stripe_events (received_at);

CREATE VIEW stripe_event_states AS
SELECT e.id, e.type, e.created, e.livemode, e.stripe_customer_id,
       COALESCE(q.state, CASE WHEN e.state = 'skipped' THEN 'skipped' ELSE 'applied' END) AS state,
       COALESCE(q.attempts, e.attempts) AS attempts,
       CASE WHEN q.event_id IS NULL THEN e.last_error ELSE q.last_error END AS last_error,
       e.received_at, e.seq, q.next_attempt_at
FROM stripe_events e LEFT JOIN stripe_event_queue q ON q.event_id = e.id;
