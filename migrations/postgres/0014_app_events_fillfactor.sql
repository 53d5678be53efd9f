-- A claim rewrites each event's claim columns (attempts, claim_token, locked_until), none of
-- them indexed: with room left on the page Postgres updates the row in place (a HOT update)
-- instead of adding an entry to each of the table's seven indexes. Existing pages keep their
-- packing until rewritten; new ones leave a third free.
ALTER TABLE app_events SET (fillfactor = 70);
