-- Fenced outbox claims (issue 12 §8, §10).
-- Each claim stores a fresh random token; a worker's writes for its job only take effect while
-- the row still carries its token, and the push's idempotency key is made from it.
ALTER TABLE outbox ADD COLUMN claim_token TEXT;

-- Never two jobs in flight for one user, atomically across instances. Rows that break it
-- (left by the old, unfenced claim) keep the oldest in flight; the others go back to pending,
-- or are done when a pending job of their kind already covers them.
UPDATE outbox o
SET state = CASE WHEN EXISTS (SELECT 1 FROM outbox p WHERE p.user_id = o.user_id
                                 AND p.kind = o.kind AND p.state = 'pending')
                 THEN 'done' ELSE 'pending' END,
    locked_until = NULL, next_attempt_at = now(), updated_at = now()
WHERE o.state = 'in_flight'
  AND o.id <> (SELECT min(f.id) FROM outbox f WHERE f.user_id = o.user_id AND f.state = 'in_flight');

CREATE UNIQUE INDEX outbox_one_in_flight_per_user_idx ON outbox (user_id) WHERE state = 'in_flight';
