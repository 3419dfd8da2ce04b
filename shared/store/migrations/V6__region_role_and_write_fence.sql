-- Region roles: which region is the write region, in which write epoch, and the fence that
-- stops its writes.
-- Both regions run the same migrations; each database holds its own row.

-- One row: this database's region, the write region of the current write epoch, and whether
-- this region may commit writes now. The Write API creates the row at its first start
-- (`tandem_store::roles::ensure`); a failover will move the write region and bump the epoch.
CREATE TABLE region_role (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    region      text NOT NULL,
    write_region text NOT NULL,
    write_epoch  bigint NOT NULL CHECK (write_epoch >= 1),
    -- false while this region's writes are fenced (a switchover in progress)
    writable    boolean NOT NULL DEFAULT true,
    changed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Every outbox row says where and in which write epoch it was written; events carry both.
-- Rows from before this migration have neither (Region 1 was the only write region).
ALTER TABLE outbox ADD COLUMN origin text, ADD COLUMN write_epoch bigint;

-- The fence, in the database: an outbox row (so a write: every write commits one) can only be
-- inserted while this region is the write region and is writable. The insert holds a
-- shared advisory lock until its transaction ends; `tandem_fence_writes` takes the same lock
-- exclusively before it clears `writable`, so it waits for every write already past this check
-- and every later write reads the cleared flag. No write commits after the fence.
--
-- The role is read in a statement of its own, after the lock: under READ COMMITTED each
-- statement of this (volatile) function takes a fresh snapshot, so a fence that committed
-- while this write waited is seen. A write under REPEATABLE READ or SERIALIZABLE would read
-- its transaction's first snapshot, which may predate the fence: it is refused.
CREATE FUNCTION tandem_outbox_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    role region_role;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'writes must run under READ COMMITTED (the write fence reads the region role after its lock)'
            USING ERRCODE = 'TD002';
    END IF;
    -- 0x74616e64656d0003: "tandem", 3
    PERFORM pg_advisory_xact_lock_shared(8386105358618001411);
    SELECT * INTO role FROM region_role;
    IF NOT FOUND THEN
        -- No role recorded yet: a Write API of the previous release still writing during a
        -- rolling upgrade, before the first new one recorded the role (right after it
        -- migrated). Its rows stay unstamped, as before this migration; nothing can have
        -- fenced a database without a role.
        RETURN NEW;
    END IF;
    IF role.write_region <> role.region OR NOT role.writable THEN
        RAISE EXCEPTION USING ERRCODE = 'TD001', DETAIL = role.write_region,
            HINT = role.write_epoch::text,
            MESSAGE = CASE WHEN role.write_region = role.region
                THEN format('%s does not take writes: its writes are fenced (write epoch %s)',
                            role.region, role.write_epoch)
                ELSE format('%s does not take writes: the write region of write epoch %s is %s',
                            role.region, role.write_epoch, role.write_region) END;
    END IF;
    NEW.origin := role.region;
    NEW.write_epoch := role.write_epoch;
    RETURN NEW;
END
$$;

CREATE TRIGGER outbox_stamp BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION tandem_outbox_stamp();

-- Fences this region's writes: returns once no write can commit any more (in-flight writes
-- have committed or failed). Idempotent.
CREATE FUNCTION tandem_fence_writes() RETURNS region_role LANGUAGE plpgsql AS $$
DECLARE
    role region_role;
BEGIN
    PERFORM pg_advisory_xact_lock(8386105358618001411);
    IF NOT EXISTS (SELECT FROM region_role) THEN
        RAISE EXCEPTION 'this database has no region role yet: start the Write API once (it records the role)'
            USING ERRCODE = 'TD002';
    END IF;
    UPDATE region_role SET writable = false, changed_at = clock_timestamp()
        WHERE writable RETURNING * INTO role;
    IF NOT FOUND THEN
        SELECT * INTO role FROM region_role;
    END IF;
    RETURN role;
END
$$;

-- Lifts the fence (a switchover abandoned, or this region made the write region). Idempotent.
CREATE FUNCTION tandem_unfence_writes() RETURNS region_role LANGUAGE plpgsql AS $$
DECLARE
    role region_role;
BEGIN
    UPDATE region_role SET writable = true, changed_at = clock_timestamp()
        WHERE NOT writable RETURNING * INTO role;
    IF NOT FOUND THEN
        SELECT * INTO role FROM region_role;
    END IF;
    RETURN role;
END
$$;
