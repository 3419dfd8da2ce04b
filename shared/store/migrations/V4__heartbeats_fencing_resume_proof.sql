-- Region 2 never lies: truthful lag, fenced leaders, proven resumption.

-- Region 2: the newest relay heartbeat applied per partition. Its time is Region 1's commit
-- clock ("every write committed before this was published before the heartbeat"), so
-- Region 2's lag is the age of the oldest of them: it grows whatever stalls between Region 1's
-- commits and Region 2's applies (relay, broker, consumer, a blocked apply).
CREATE TABLE replication_heartbeats (
    topic        text NOT NULL,
    partition    integer NOT NULL,
    origin_time  timestamptz NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (topic, partition)
);

-- Both regions: one row per elected worker role. A leader increments the epoch when it is
-- elected and every publish or apply transaction it commits checks, under a share lock, that
-- the epoch is still its own: a process that lost its leadership cannot commit, even under
-- load, even before it notices.
CREATE TABLE leader_epochs (
    role        text PRIMARY KEY,
    epoch       bigint NOT NULL DEFAULT 0,
    holder      text,
    elected_at  timestamptz
);

-- Region 2: proof of the record at next_offset - 1 for any record, dead letters and
-- heartbeats included: SHA-256 of its key and payload.
ALTER TABLE consumer_offsets ADD COLUMN last_record_hash bytea;
