-- Each key's first pending event (issue 15's delivery benchmark): a claim reads these few rows
-- instead of grouping every pending event by key on every round. Kept in the transactions that
-- change a key's pending events: the sequencer adds heads for keys it gives positions to, a
-- finished delivery moves its key's head to the next pending event (or removes it), a
-- redelivery and a prune move it back or on, an erasure removes it. `position` NULL only
-- inside a finishing transaction, between moving a head and removing an exhausted one.
CREATE TABLE app_event_heads (
    event_key TEXT PRIMARY KEY,
    position BIGINT
);
CREATE INDEX app_event_heads_position_idx ON app_event_heads (position);

INSERT INTO app_event_heads (event_key, position)
SELECT event_key, min(position) FROM app_events
WHERE state = 'pending' AND position IS NOT NULL
GROUP BY event_key;
