-- Reconciliation runs and their reports, kept in the database so that any instance answers
-- GET /v1/reconcile/{id}. A live run holds a lease it renews while it works; one whose lease
-- ran out (its process stopped) reads as interrupted, and at most one run is live at a time
-- across instances (the partial unique index).
CREATE TABLE reconcile_runs (
    id          TEXT PRIMARY KEY,
    apply       INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
    progress    TEXT NOT NULL,
    report      TEXT,
    error       TEXT,
    started_at  INTEGER NOT NULL,
    lease_until INTEGER NOT NULL,
    finished_at INTEGER
);

CREATE UNIQUE INDEX reconcile_runs_one_running ON reconcile_runs (status) WHERE status = 'running';
CREATE INDEX reconcile_runs_by_start ON reconcile_runs (started_at);

-- The linked customers a run has met in Stripe's list: the links it did not meet (customers
-- Stripe may no longer have) are found by a join, not by holding every id in memory.
CREATE TABLE reconcile_seen (
    run_id      TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    PRIMARY KEY (run_id, customer_id)
);
