-- The lost tail of a deposed write region: events written in a write epoch older than the one
-- this database records, which a consumer received but must neither apply (they were never part
-- of the new write region's history) nor drop. Kept with their original payloads until an
-- operator has dealt with them (`tandem lost-writes`).
CREATE TABLE quarantined_events (
    event_id       uuid PRIMARY KEY,
    topic          text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset   bigint NOT NULL,
    -- where and in which write epoch the event was written
    origin         text NOT NULL,
    write_epoch    bigint NOT NULL,
    -- the write epoch this database recorded when the event arrived
    superseded_by  bigint NOT NULL,
    collection     text COLLATE "C" NOT NULL,
    document_id    text COLLATE "C" NOT NULL,
    version        bigint NOT NULL,
    -- the write's commit time in its region
    event_time     timestamptz NOT NULL,
    -- the Kafka record's value, byte for byte
    payload        bytea NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX quarantined_events_superseded_by ON quarantined_events (superseded_by, event_time);
