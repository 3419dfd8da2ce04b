-- Hostile input cannot stop replication: sizes the database measures itself, a dead-letter
-- table for outbox rows the relay cannot publish, and dead letters that store any bytes.

-- The size of a document's JSON text as PostgreSQL renders it (what the outbox payload, the
-- Kafka event and Region 2 carry; numbers are written out in full). Measured once, at write
-- time; list pages budget with it.
ALTER TABLE documents
    ADD COLUMN data_bytes integer GENERATED ALWAYS AS (coalesce(octet_length(data::text), 0)) STORED;
-- shared/src/limits.rs MAX_DOCUMENT_BYTES. NOT VALID: rows written before the limit existed
-- stay readable; every new write is checked.
ALTER TABLE documents
    ADD CONSTRAINT documents_data_size CHECK (data_bytes <= 524288) NOT VALID;

-- The relay budgets its batches by bytes without rendering payloads twice.
ALTER TABLE outbox
    ADD COLUMN payload_bytes integer GENERATED ALWAYS AS (octet_length(payload::text)) STORED;

-- Outbox rows the relay could not publish for a reason retrying will not fix (too large,
-- refused by the broker as invalid): moved here, with the reason, so publishing goes on.
-- Replication is state-based and version-guarded: the document's next write still brings
-- Region 2 up to date.
CREATE TABLE relay_dead_letters (
    seq               bigint PRIMARY KEY,
    event_id          uuid NOT NULL,
    collection        text COLLATE "C" NOT NULL,
    document_id       text COLLATE "C" NOT NULL,
    version           bigint NOT NULL,
    operation         text NOT NULL,
    payload           jsonb NOT NULL,
    traceparent       text,
    created_at        timestamptz NOT NULL,
    reason            text NOT NULL,
    dead_lettered_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Region 2 dead letters keep whatever bytes arrived: keys and header values as bytea (NUL
-- bytes, invalid UTF-8), header names as text (the Kafka client only reads names that are
-- UTF-8; an unreadable name is stored as NULL and named in the reason).
ALTER TABLE dead_letters
    ALTER COLUMN message_key TYPE bytea USING convert_to(message_key, 'UTF8');
ALTER TABLE dead_letters
    ADD COLUMN header_names text[] NOT NULL DEFAULT '{}',
    ADD COLUMN header_values bytea[] NOT NULL DEFAULT '{}';
UPDATE dead_letters d SET
    header_names = h.names,
    header_values = h.values_
FROM (
    SELECT id,
           array_agg(key ORDER BY key) AS names,
           array_agg(convert_to(value, 'UTF8') ORDER BY key) AS values_
    FROM dead_letters, jsonb_each_text(headers)
    GROUP BY id
) h
WHERE d.id = h.id;
ALTER TABLE dead_letters DROP COLUMN headers;
