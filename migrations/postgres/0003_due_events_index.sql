-- The applier picks customers from the oldest pending events; this keeps that a short index
-- scan however many events are waiting (the old query grouped every pending row).
CREATE INDEX stripe_events_due_idx ON stripe_events (arrival_seq) WHERE state = 'pending';
