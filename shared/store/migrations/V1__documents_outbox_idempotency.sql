-- Documents, the transactional outbox and idempotency keys.
--
-- Region 1 writes documents and outbox rows in one transaction. Region 2 uses the same
-- documents table (filled by the consumer); its outbox stays empty.

CREATE TABLE documents (
    collection  text COLLATE "C" NOT NULL,
    -- "C" collation: list pagination orders ids bytewise, identically in every region and
    -- whatever the cluster's locale, and the primary key index serves the keyset scan.
    id          text COLLATE "C" NOT NULL,
    version     bigint NOT NULL CHECK (version > 0),
    -- NULL for a tombstone.
    data        jsonb,
    deleted     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (collection, id),
    CHECK (deleted = (data IS NULL))
);

CREATE TABLE outbox (
    -- Insertion order. NOT a safe publication cursor on its own: a transaction that took a
    -- lower seq can commit after one that took a higher seq. The relay therefore selects
    -- unpublished rows (published_at IS NULL) rather than "seq > last published", so a late
    -- committer is never skipped; per-document order holds because writers of one document
    -- serialise on its row lock before they insert their outbox row.
    seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    -- The writing transaction, so a relay can also reason about commit visibility
    -- (pg_snapshot_xmin) if it ever needs a watermark rather than a flag.
    txid          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    collection    text COLLATE "C" NOT NULL,
    document_id   text COLLATE "C" NOT NULL,
    version       bigint NOT NULL,
    operation     text NOT NULL CHECK (operation IN ('upsert', 'delete')),
    payload       jsonb NOT NULL,
    traceparent   text,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at  timestamptz
);

-- The relay's work queue: small, because published rows leave it.
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
-- Pruning and point-in-time replay.
CREATE INDEX outbox_created_at ON outbox (created_at);

CREATE TABLE idempotency_keys (
    -- Keys are scoped to the authenticated principal (JWT subject), as clients choose them.
    principal    text NOT NULL,
    key          text NOT NULL,
    -- SHA-256 of method, path and body: the same key with another request is refused.
    fingerprint  bytea NOT NULL,
    -- The original outcome, replayed verbatim on retry.
    outcome      jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (principal, key)
);

CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
