-- The plans file every user has been told about (`plan.changed`), in billsync's canonical
-- form, and the default plan it gave (what a user without a `user_plans` row was told).
-- At start-up a different file starts a pass over every user; the row changes when it ends.
CREATE TABLE plans_announced (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    plans TEXT NOT NULL,
    default_plan TEXT
);

-- What was announced, not only which plan: a plan whose features or limits changed in the
-- file is announced again. NULL on rows written before this column: taken as unchanged.
ALTER TABLE user_plans ADD COLUMN plan TEXT;
