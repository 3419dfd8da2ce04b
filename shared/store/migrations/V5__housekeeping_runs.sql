-- Both regions: what housekeeping last did, per kind of row it sheds (`outbox`,
-- `idempotency_keys` in Region 1; `applied_events` in Region 2), so `tandem status` can say when
-- each region last pruned and how much. Each pruning round writes its row in the same statement
-- as its DELETE: the record never claims rows that were not removed, nor misses any that were.
CREATE TABLE housekeeping_runs (
    target         text PRIMARY KEY,
    -- When the last pass started (every round of one pass carries the same time).
    ran_at         timestamptz NOT NULL,
    -- Rows that pass removed (so far, while it runs).
    rows_removed   bigint NOT NULL,
    -- Rows removed since the table exists.
    total_removed  bigint NOT NULL
);
