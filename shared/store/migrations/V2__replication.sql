-- Replication: waking the relay in Region 1, and the consumer's bookkeeping in Region 2.
-- Both regions run the same migrations; each uses its own part.

-- Region 1: one notification per writing statement wakes the relay at once; it also polls,
-- so a lost notification only costs one poll interval.
CREATE FUNCTION tandem_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tandem_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION tandem_outbox_notify();

-- Region 2: every event the consumer has seen, committed in the same transaction as its
-- effect. The primary key is what makes a redelivered event a no-op: no event is applied twice.
CREATE TABLE applied_events (
    event_id     uuid PRIMARY KEY,
    collection   text COLLATE "C" NOT NULL,
    document_id  text COLLATE "C" NOT NULL,
    version      bigint NOT NULL,
    -- 'applied', or 'stale' when Region 2 already held this or a newer version.
    outcome      text NOT NULL CHECK (outcome IN ('applied', 'stale')),
    event_time   timestamptz NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX applied_events_applied_at ON applied_events (applied_at);

-- The Kafka position applied so far, per partition, committed with the effects: the source of
-- truth the consumer resumes from (Kafka's committed offsets are informational only).
CREATE TABLE consumer_offsets (
    topic          text NOT NULL,
    partition      integer NOT NULL,
    next_offset    bigint NOT NULL,
    -- The event at next_offset - 1, to recognise a partition that was recreated.
    last_event_id  uuid,
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (topic, partition)
);

-- Poison events: kept with the reason, never blocking the events behind them.
CREATE TABLE dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic           text NOT NULL,
    partition       integer NOT NULL,
    "offset"        bigint NOT NULL,
    message_key     text,
    payload         bytea,
    headers         jsonb NOT NULL DEFAULT '{}',
    reason          text NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    redriven_at     timestamptz,
    redrive_result  text,
    UNIQUE (topic, partition, "offset")
);

-- What the Read API needs to report lag without talking to Kafka.
CREATE TABLE replication_status (
    id               integer PRIMARY KEY CHECK (id = 1),
    -- Region 1 commit time of the newest applied event.
    last_event_time  timestamptz,
    last_applied_at  timestamptz,
    -- Messages waiting in Kafka (high watermark minus position), summed over partitions.
    backlog          bigint NOT NULL DEFAULT 0,
    -- The active consumer's liveness.
    heartbeat_at     timestamptz
);

INSERT INTO replication_status (id) VALUES (1);
