-- The profile version stamped into the customer's metadata (billsync_profile_version) by the
-- newest push recorded: tells an echo of any earlier push from a Stripe-side change. NULL for
-- links whose pushes predate the stamp.
ALTER TABLE customer_links ADD COLUMN pushed_stamp BIGINT;
