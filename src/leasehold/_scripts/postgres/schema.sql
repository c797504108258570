-- leasehold PostgreSQL schema, version 2 (PostgreSQL 12 or newer).
--
-- The library runs this file itself on first use of a store, inside one transaction
-- guarded by a transaction-level advisory lock, so concurrent first use is safe; it
-- is idempotent (CREATE ... IF NOT EXISTS, CREATE OR REPLACE), and running it over
-- an older version upgrades that version in place (version 1 -> 2 adds the records
-- table and its functions; nothing existing changes shape). Teams that manage
-- schema changes themselves apply it as a migration and set ?create_schema=false:
--
--     psql --single-transaction -v ON_ERROR_STOP=1 -f schema.sql "$DATABASE_URL"
--
-- Run it in one transaction (as above) so that concurrent installs serialise on the
-- advisory lock. The search_path it sets is put back at the end. To install into
-- another schema, replace the schema name in the two lines marked (*) -- nothing
-- else names the schema -- and put ?schema=<name> in the store URL. Every function pins
-- its search_path at creation ("SET search_path FROM CURRENT"), so callers need no
-- search_path of their own.
--
-- Privileges for an application role that did not create the objects:
--     GRANT USAGE ON SCHEMA leasehold TO app;
--     GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA leasehold TO app;
--     GRANT USAGE ON ALL SEQUENCES IN SCHEMA leasehold TO app;
--     GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA leasehold TO app;  -- PUBLIC by default
--
-- Objects
--   fence_seq   one sequence for every name. Grants of one name are serialised by a
--               transaction-level advisory lock, so fences per name are strictly
--               increasing; a sequence is WAL-logged and never goes backwards, not
--               even after crash recovery, and nothing per name outlives the name's
--               last holder. CACHE 1 is essential (a cache hands out values out of
--               order across sessions). Record versions are drawn from it too.
--   waiter_seq  arrival order of the wait queue.
--   holders     live grants. Expiry is on the SERVER clock (clock_timestamp()); rows
--               past expires_at are treated as absent and purged lazily.
--   waiters     FIFO wait queue per name. channel/wake_key: where and what to NOTIFY
--               to wake this waiter (NULL channel: the waiter polls). wake_key is a
--               hash of (name, token), so tokens never travel in notifications.
--   records     small versioned values changed only by compare-and-set (version 2).
--               version comes from fence_seq; expires_at is on the server clock,
--               NULL for never; expired rows are absent to every operation and
--               purged lazily. Record keys are a namespace apart from lease names.
--
-- Functions (each is one short transaction when called in autocommit mode):
--   acquire(name, token, owner, host, pid, ttl, limit, queue_ttl, channel, wake_key)
--       -> (granted, fence, retry_after, queue_position)
--   renew(names[], tokens[], ttls[]) -> boolean[]  (answers in item order)
--   release(name, token) -> boolean                 (was a live holder)
--   break_lease(name) -> integer                    (live holders removed)
--   holders_of(name) / leases(prefix) -> live holders with held_for/expires_in (s)
--   read_record(key) -> (value, version, now)   (version 0 and NULL value if absent;
--       now: clock_timestamp() as Unix seconds, the time base of every expiry)
--   write_record(key, expected_version, value, ttl) -> bigint   (the new version,
--       NULL if the current version -- 0 when absent -- was not expected_version;
--       a NULL value deletes, a NULL ttl never expires)
--   purge(now)  (called by acquire and write_record now and then: drops long-expired
--               rows of any name or key)
--   schema_version() -> integer
-- Durations are seconds (double precision). The advisory lock of a name is
-- (hashtext(schema), hashtext(name)) in the two-key space, which never conflicts with
-- an application's one-key (bigint) advisory locks; a record key's is
-- (hashtext(schema || ':record'), hashtext(key)).

SELECT pg_advisory_xact_lock(hashtext('leasehold'), hashtext('install'));
CREATE SCHEMA IF NOT EXISTS leasehold;                                       -- (*)
SELECT set_config('leasehold.saved_search_path', current_setting('search_path'), false);
SET search_path = leasehold, pg_temp;                                        -- (*)
-- leasehold:body (the library runs its own transaction-local version of the
-- statements above, for ?schema=, then everything down to leasehold:end)

CREATE SEQUENCE IF NOT EXISTS fence_seq AS bigint CACHE 1 NO CYCLE;
CREATE SEQUENCE IF NOT EXISTS waiter_seq AS bigint CACHE 1 NO CYCLE;

-- fillfactor leaves room on each page so that renewals (which only change
-- expires_at, an unindexed column) are HOT updates and do not bloat the index.
CREATE TABLE IF NOT EXISTS holders (
    name         text COLLATE "C" NOT NULL,
    token        text COLLATE "C" NOT NULL,
    owner        text NOT NULL,
    host         text NOT NULL,
    pid          integer NOT NULL,
    fence        bigint NOT NULL,
    holder_limit integer NOT NULL,
    granted_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (name, token)
) WITH (fillfactor = 70);

CREATE TABLE IF NOT EXISTS waiters (
    name         text COLLATE "C" NOT NULL,
    token        text COLLATE "C" NOT NULL,
    seq          bigint NOT NULL,
    holder_limit integer NOT NULL,
    channel      text,
    wake_key     text,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (name, token)
);
CREATE INDEX IF NOT EXISTS waiters_name_seq ON waiters (name, seq);

-- Version 2. value is never NULL: writing NULL deletes the row.
CREATE TABLE IF NOT EXISTS records (
    key          text COLLATE "C" PRIMARY KEY,
    value        bytea NOT NULL,
    version      bigint NOT NULL,
    expires_at   timestamptz
) WITH (fillfactor = 70);

CREATE OR REPLACE FUNCTION schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE
AS $$ SELECT 2 $$;

-- Serialises every state change of one name (grants, release, break) for the rest
-- of the transaction. Transaction-scoped, so it is safe behind transaction-mode
-- poolers and can never outlive the transaction.
CREATE OR REPLACE FUNCTION lock_name(p_name text) RETURNS void
LANGUAGE sql
SET search_path FROM CURRENT
AS $$ SELECT pg_advisory_xact_lock(hashtext(current_schema()), hashtext(p_name)) $$;

-- NOTIFY the first waiters of p_name that fit in the free places (O(free), not all).
-- Called with the name locked. Notifications are delivered on commit.
CREATE OR REPLACE FUNCTION wake(p_name text, p_now timestamptz, p_limit integer)
RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_free integer;
BEGIN
    SELECT p_limit - count(*) INTO v_free
    FROM holders h WHERE h.name = p_name AND h.expires_at > p_now;
    IF v_free <= 0 THEN
        RETURN;
    END IF;
    -- LIMIT before the channel filter: a polling waiter at the head still holds its
    -- place, and waking the one behind it would be useless.
    PERFORM pg_notify(w.channel, w.wake_key)
    FROM (
        SELECT q.channel, q.wake_key FROM waiters q
        WHERE q.name = p_name AND q.expires_at > p_now
        ORDER BY q.seq
        LIMIT v_free
    ) w
    WHERE w.channel IS NOT NULL;
END
$$;

-- Removes rows that expired a while ago under names nobody touches any more
-- (acquire and release purge their own name; this bounds the rest). Expired rows
-- are absent to every operation already, so deleting them without the name's lock
-- changes no answer; SKIP LOCKED keeps it from ever waiting.
CREATE OR REPLACE FUNCTION purge(p_now timestamptz) RETURNS void
LANGUAGE sql
SET search_path FROM CURRENT
AS $$
    DELETE FROM holders WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM holders WHERE expires_at <= p_now - interval '1 minute'
        LIMIT 500 FOR UPDATE SKIP LOCKED));
    DELETE FROM waiters WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM waiters WHERE expires_at <= p_now - interval '1 minute'
        LIMIT 500 FOR UPDATE SKIP LOCKED));
    DELETE FROM records WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM records WHERE expires_at <= p_now - interval '1 minute'
        LIMIT 500 FOR UPDATE SKIP LOCKED));
$$;

CREATE OR REPLACE FUNCTION acquire(
    p_name text, p_token text, p_owner text, p_host text, p_pid integer,
    p_ttl double precision, p_limit integer, p_queue_ttl double precision,
    p_channel text, p_wake_key text,
    OUT granted boolean, OUT fence bigint, OUT retry_after double precision,
    OUT queue_position integer)
LANGUAGE plpgsql
SET search_path FROM CURRENT
SET lock_timeout = '10s'
AS $$
DECLARE
    v_now timestamptz;
    v_holders integer;
    v_seq bigint;
    v_ahead integer;
BEGIN
    PERFORM lock_name(p_name);
    -- Read the clock after the lock: time spent waiting must not shorten the lease.
    v_now := clock_timestamp();
    -- Blocking deletes on purpose: if a renewal holds the row lock, wait for it and
    -- re-check, so a holder renewed in time is never counted as expired.
    DELETE FROM holders h WHERE h.name = p_name AND h.expires_at <= v_now;
    DELETE FROM waiters w WHERE w.name = p_name AND w.expires_at <= v_now;
    IF random() < 0.01 THEN
        PERFORM purge(v_now);
    END IF;

    UPDATE holders h SET expires_at = v_now + make_interval(secs => p_ttl)
    WHERE h.name = p_name AND h.token = p_token
    RETURNING h.fence INTO fence;
    IF FOUND THEN
        -- Retried acquire whose first answer was lost: same grant, same fence.
        DELETE FROM waiters w WHERE w.name = p_name AND w.token = p_token;
        granted := true;
        RETURN;
    END IF;

    SELECT count(*) INTO v_holders FROM holders h WHERE h.name = p_name;
    SELECT w.seq INTO v_seq FROM waiters w WHERE w.name = p_name AND w.token = p_token;
    SELECT count(*) INTO v_ahead FROM waiters w
    WHERE w.name = p_name AND (v_seq IS NULL OR w.seq < v_seq);

    IF v_holders < p_limit AND v_ahead < p_limit - v_holders THEN
        -- A fence handed out must never be handed out again: with
        -- synchronous_commit=off a crash could lose this commit after the client saw
        -- the fence. 'local' and stronger settings are left alone.
        IF current_setting('synchronous_commit') = 'off' THEN
            PERFORM set_config('synchronous_commit', 'on', true);
        END IF;
        fence := nextval('fence_seq');
        INSERT INTO holders (name, token, owner, host, pid, fence, holder_limit,
                             granted_at, expires_at)
        VALUES (p_name, p_token, p_owner, p_host, p_pid, fence, p_limit,
                v_now, v_now + make_interval(secs => p_ttl));
        IF v_seq IS NOT NULL THEN
            DELETE FROM waiters w WHERE w.name = p_name AND w.token = p_token;
        END IF;
        granted := true;
        RETURN;
    END IF;

    granted := false;
    SELECT extract(epoch FROM min(h.expires_at) - v_now)::double precision
    INTO retry_after FROM holders h WHERE h.name = p_name;
    IF v_seq IS NOT NULL THEN
        queue_position := v_ahead;
        IF p_queue_ttl IS NOT NULL THEN
            -- Keeps its place (seq); the channel follows the store that asks now.
            UPDATE waiters w
            SET expires_at = v_now + make_interval(secs => p_queue_ttl),
                channel = p_channel, wake_key = p_wake_key, holder_limit = p_limit
            WHERE w.name = p_name AND w.token = p_token;
        END IF;
    ELSIF p_queue_ttl IS NOT NULL THEN
        INSERT INTO waiters (name, token, seq, holder_limit, channel, wake_key, expires_at)
        VALUES (p_name, p_token, nextval('waiter_seq'), p_limit, p_channel, p_wake_key,
                v_now + make_interval(secs => p_queue_ttl));
        queue_position := v_ahead;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION renew(
    p_names text[], p_tokens text[], p_ttls double precision[])
RETURNS boolean[]
LANGUAGE plpgsql
SET search_path FROM CURRENT
SET lock_timeout = '10s'
AS $$
DECLARE
    v_now timestamptz;
    v_answers boolean[];
BEGIN
    -- Lock the rows in index order first: acquire's purge deletes in that order too,
    -- so a batch renewal and a purge of the same name can never deadlock.
    PERFORM 1
    FROM holders h
    JOIN unnest(p_names, p_tokens) AS i(name, token)
      ON h.name = i.name AND h.token = i.token
    ORDER BY h.name, h.token
    FOR UPDATE OF h;
    v_now := clock_timestamp();
    WITH items AS (
        SELECT * FROM unnest(p_names, p_tokens, p_ttls) WITH ORDINALITY
            AS i(name, token, ttl, ord)
    ), renewed AS (
        UPDATE holders h SET expires_at = v_now + make_interval(secs => i.ttl)
        FROM items i
        WHERE h.name = i.name AND h.token = i.token AND h.expires_at > v_now
        RETURNING h.name, h.token
    )
    SELECT coalesce(array_agg(EXISTS (
               SELECT 1 FROM renewed r WHERE r.name = i.name AND r.token = i.token
           ) ORDER BY i.ord), '{}')
    INTO v_answers
    FROM items i;
    RETURN v_answers;
END
$$;

CREATE OR REPLACE FUNCTION release(p_name text, p_token text) RETURNS boolean
LANGUAGE plpgsql
SET search_path FROM CURRENT
SET lock_timeout = '10s'
AS $$
DECLARE
    v_now timestamptz;
    v_live boolean;
    v_limit integer;
    v_was_waiting boolean;
BEGIN
    PERFORM lock_name(p_name);
    v_now := clock_timestamp();
    DELETE FROM holders h WHERE h.name = p_name AND h.token = p_token
    RETURNING h.expires_at > v_now, h.holder_limit INTO v_live, v_limit;
    DELETE FROM waiters w WHERE w.name = p_name AND w.token = p_token
    RETURNING true INTO v_was_waiting;
    IF v_live IS NOT NULL OR v_was_waiting THEN
        IF v_limit IS NULL THEN
            SELECT max(h.holder_limit) INTO v_limit
            FROM holders h WHERE h.name = p_name AND h.expires_at > v_now;
        END IF;
        PERFORM wake(p_name, v_now, coalesce(v_limit, 1));
    END IF;
    RETURN coalesce(v_live, false);
END
$$;

CREATE OR REPLACE FUNCTION break_lease(p_name text) RETURNS integer
LANGUAGE plpgsql
SET search_path FROM CURRENT
SET lock_timeout = '10s'
AS $$
DECLARE
    v_now timestamptz;
    v_count integer;
    v_limit integer;
BEGIN
    PERFORM lock_name(p_name);
    v_now := clock_timestamp();
    WITH gone AS (
        DELETE FROM holders h WHERE h.name = p_name
        RETURNING h.expires_at > v_now AS live, h.holder_limit
    )
    SELECT count(*) FILTER (WHERE live), max(holder_limit) FILTER (WHERE live)
    INTO v_count, v_limit FROM gone;
    PERFORM wake(p_name, v_now, coalesce(v_limit, 1));
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION holders_of(p_name text)
RETURNS TABLE (name text, owner text, host text, pid integer, fence bigint,
               holder_limit integer, held_for double precision,
               expires_in double precision)
LANGUAGE sql
SET search_path FROM CURRENT
AS $$
    SELECT h.name, h.owner, h.host, h.pid, h.fence, h.holder_limit,
           greatest(extract(epoch FROM c.now - h.granted_at), 0)::double precision,
           extract(epoch FROM h.expires_at - c.now)::double precision
    FROM (SELECT clock_timestamp() AS now) c
    JOIN holders h ON h.name = p_name AND h.expires_at > c.now
    ORDER BY h.fence
$$;

-- starts_with() instead of LIKE: no wildcard escaping to get wrong. The range
-- condition (byte order, the columns are COLLATE "C") lets the primary key index
-- find the first candidate.
CREATE OR REPLACE FUNCTION leases(p_prefix text)
RETURNS TABLE (name text, owner text, host text, pid integer, fence bigint,
               holder_limit integer, held_for double precision,
               expires_in double precision)
LANGUAGE sql
SET search_path FROM CURRENT
AS $$
    SELECT h.name, h.owner, h.host, h.pid, h.fence, h.holder_limit,
           greatest(extract(epoch FROM c.now - h.granted_at), 0)::double precision,
           extract(epoch FROM h.expires_at - c.now)::double precision
    FROM (SELECT clock_timestamp() AS now) c
    JOIN holders h ON h.name >= p_prefix AND starts_with(h.name, p_prefix)
                  AND h.expires_at > c.now
    ORDER BY h.name, h.fence
$$;

-- The store's clock for records: the same clock_timestamp() every expiry is written
-- and compared with, as Unix seconds (what server_time() reports too).
CREATE OR REPLACE FUNCTION read_record(
    p_key text, OUT value bytea, OUT version bigint, OUT now double precision)
LANGUAGE sql
SET search_path FROM CURRENT
AS $$
    SELECT r.value, coalesce(r.version, 0), extract(epoch FROM c.now)::double precision
    FROM (SELECT clock_timestamp() AS now) c
    LEFT JOIN records r ON r.key = p_key AND (r.expires_at IS NULL OR r.expires_at > c.now)
$$;

-- Compare-and-set. Writes of one key are serialised by a transaction-level advisory
-- lock (an absent key has no row to lock), in a key space of its own, so records
-- never wait for lease names.
CREATE OR REPLACE FUNCTION write_record(
    p_key text, p_expected bigint, p_value bytea, p_ttl double precision)
RETURNS bigint
LANGUAGE plpgsql
SET search_path FROM CURRENT
SET lock_timeout = '10s'
AS $$
DECLARE
    v_now timestamptz;
    v_current bigint;
    v_version bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || ':record'), hashtext(p_key));
    -- Read the clock after the lock: time spent waiting must not shorten the ttl.
    v_now := clock_timestamp();
    -- Blocking on purpose, like acquire: a purge holding the row is waited for.
    DELETE FROM records r WHERE r.key = p_key AND r.expires_at <= v_now;
    IF random() < 0.01 THEN
        PERFORM purge(v_now);
    END IF;
    SELECT r.version INTO v_current FROM records r WHERE r.key = p_key;
    IF coalesce(v_current, 0) <> p_expected THEN
        RETURN NULL;
    END IF;
    -- A version handed out must never be handed out again (see acquire).
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    v_version := nextval('fence_seq');
    IF p_value IS NULL THEN
        DELETE FROM records r WHERE r.key = p_key;
    ELSE
        INSERT INTO records AS r (key, value, version, expires_at)
        VALUES (p_key, p_value, v_version,
                v_now + make_interval(secs => p_ttl))
        ON CONFLICT (key) DO UPDATE
        SET value = excluded.value, version = excluded.version,
            expires_at = excluded.expires_at;
    END IF;
    RETURN v_version;
END
$$;

-- leasehold:end
SELECT set_config('search_path', current_setting('leasehold.saved_search_path'), false);
