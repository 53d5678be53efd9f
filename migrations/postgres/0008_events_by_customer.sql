-- A customer's stored events, for the GDPR export (every payload of the customer) and the
-- erasure (deleting them): without it both scan the whole inbox.
CREATE INDEX stripe_events_customer_idx ON stripe_events (stripe_customer_id, id);
