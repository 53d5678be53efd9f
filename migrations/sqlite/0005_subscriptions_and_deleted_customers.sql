-- Customers deleted in Stripe, remembered after their link is gone: a late `customer.created`
-- (Stripe retries a delivery for days) must never link one again, and `insert_link` refuses
-- them. `deleted_created` is the `created` of the `customer.deleted` event applied.
CREATE TABLE deleted_customers (
    stripe_customer_id TEXT PRIMARY KEY,
    deleted_created    INTEGER NOT NULL,
    recorded_at        INTEGER NOT NULL
);

-- The event id completes the subscriptions' watermark, as the links' does: a same-second
-- tie is told from a redelivery and settled by asking Stripe.
ALTER TABLE subscriptions ADD COLUMN event_watermark_id TEXT;

-- basil's cancellation fields (unix milliseconds), and every item (a JSON array of
-- {id, price_id, quantity, current_period_end}), not only the first.
ALTER TABLE subscriptions ADD COLUMN cancel_at INTEGER;
ALTER TABLE subscriptions ADD COLUMN canceled_at INTEGER;
ALTER TABLE subscriptions ADD COLUMN ended_at INTEGER;
ALTER TABLE subscriptions ADD COLUMN items TEXT NOT NULL DEFAULT '[]';
