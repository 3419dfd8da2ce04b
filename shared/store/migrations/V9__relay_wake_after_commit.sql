-- The relay's wake-up leaves the write transaction's commit path.
--
-- V2's statement trigger ran pg_notify inside every write transaction. PostgreSQL serialises
-- the commits of notifying transactions on one database-wide lock, held across each commit's
-- WAL flush, so durable write commits stopped grouping: pgbench running the write's
-- transaction loses 40-50 % of its rate with the NOTIFY added. The Write API now sends the
-- notification after its commit, from a separate, coalesced transaction that does not wait
-- for its own flush (tandem_store::outbox::RelayWake); every other writer of outbox rows is
-- picked up by the relay's polling (RELAY_POLL_INTERVAL_MS).
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION tandem_outbox_notify();
