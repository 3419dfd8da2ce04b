-- Moving the write region: a switchover (and later a failover) records the new write region
-- and write epoch in both databases through this function.

-- Records `new_write_region` as the write region of write epoch `new_epoch` in this database,
-- writable. Takes the fence's lock exclusively, so it waits for the writes in flight and every
-- later write reads the new role. An epoch older than the recorded one is refused (TD003: a
-- stale switchover), as is the recorded epoch with another write region; the recorded epoch
-- with the same write region changes nothing, so a switchover that stopped half-way can be run
-- again.
CREATE FUNCTION tandem_promote_write_region(new_write_region text, new_epoch bigint)
RETURNS region_role LANGUAGE plpgsql AS $$
DECLARE
    role region_role;
BEGIN
    PERFORM pg_advisory_xact_lock(8386105358618001411);
    SELECT * INTO role FROM region_role FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'this database has no region role yet: start the Write API once (it records the role)'
            USING ERRCODE = 'TD002';
    END IF;
    IF new_epoch < role.write_epoch
       OR (new_epoch = role.write_epoch AND new_write_region <> role.write_region) THEN
        RAISE EXCEPTION USING ERRCODE = 'TD003', DETAIL = role.write_region,
            HINT = role.write_epoch::text,
            MESSAGE = format('%s is already at write epoch %s (write region %s): cannot record %s at write epoch %s',
                             role.region, role.write_epoch, role.write_region, new_write_region, new_epoch);
    END IF;
    IF new_epoch = role.write_epoch THEN
        RETURN role;
    END IF;
    UPDATE region_role SET write_region = new_write_region, write_epoch = new_epoch,
        writable = true, changed_at = clock_timestamp()
        RETURNING * INTO role;
    RETURN role;
END
$$;
