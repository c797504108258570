-- leasehold PostgreSQL schema, version 8 (PostgreSQL 12 or newer).
--
-- The library runs this file itself on first use of a store, inside one transaction
-- guarded by a transaction-level advisory lock, so concurrent first use is safe; it
-- is idempotent (CREATE ... IF NOT EXISTS, CREATE OR REPLACE), and running it over
-- an older version upgrades that version in place (version 1 -> 2 adds the records
-- table and its functions; 2 -> 3 adds expires_at indexes for purge(), drops
-- lock_name() and replaces every function with a schema-qualified one without SET
-- clauses; 3 -> 4 adds four nullable columns to waiters for the hand-over, replaces
-- wake() with hand_over() and rewrites acquire, release and break_lease with the
-- same signatures; 4 -> 5 replaces acquire, whose busy answers no longer wait for
-- their WAL flush; 5 -> 6 adds the epoch and epoch_marker tables, recover() and
-- raise_limits(), the *_relaxed twins of acquire, renew, hand_over and release for
-- ?durability=relaxed, and makes every grant check the marker first; nothing
-- existing changes shape; 6 -> 7 replaces acquire, release and their *_relaxed
-- twins, same signatures and answers, with statements that set up fewer plan
-- nodes per call; 7 -> 8 replaces acquire and acquire_relaxed, same signatures
-- and answers, adding SET plan_cache_mode = force_generic_plan). Teams that manage
-- schema changes themselves apply it as a migration and set ?create_schema=false:
--
--     psql --single-transaction -v ON_ERROR_STOP=1 -f schema.sql "$DATABASE_URL"
--
-- Run it in one transaction (as above) so that concurrent installs serialise on the
-- advisory lock. The search_path it sets is put back at the end. To install into
-- another schema, replace the schema name in the two lines marked (*) -- nothing
-- else names the schema -- and put ?schema=<name> in the store URL. The functions are
-- created with the schema's name written into them (see the DO block below), so
-- callers need no search_path of their own and theirs changes nothing.
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
--               owner/host/pid/ttl/holder_limit: the waiter's latest acquire
--               request, which a hand-over grants (version 4).
--   epoch       (version 6) one row: epoch (how many crashes were detected),
--               fence_ceiling (every fence a relaxed grant handed out is below it;
--               raised durably, 2^20 at a time, by the grant that reaches it),
--               max_ttl (the longest ttl a relaxed grant, renewal or queued request
--               ever asked for; raised durably when exceeded; 0 while ?durability=
--               relaxed was never used) and quarantine_until (no lease is granted
--               before it). WAL-logged: only ever written with a durable commit.
--   epoch_marker (version 6) UNLOGGED copy of the epoch row. PostgreSQL empties
--               unlogged tables in every crash recovery (an immediate shutdown, a
--               killed postmaster, a backend crash that restarts the server, a
--               promoted standby), while a clean shutdown keeps them: a grant that
--               finds it empty knows the last commits may be lost and calls
--               recover(), which bumps the epoch durably, moves fence_seq up to
--               fence_ceiling (above every fence handed out before the crash, even
--               one whose commit was lost) and sets quarantine_until to now +
--               max_ttl, so a holder whose grant (or renewal) the crash lost is past
--               its own safe deadline before anyone else is granted the name.
--   records     small versioned values changed only by compare-and-set (version 2).
--               version comes from fence_seq; expires_at is on the server clock,
--               NULL for never; expired rows are absent to every operation and
--               purged lazily. Record keys are a namespace apart from lease names.
--
-- Functions (each is one short transaction when called in autocommit mode):
--   acquire(name, token, owner, host, pid, ttl, limit, queue_ttl, channel, wake_key)
--       -> (granted, fence, retry_after, queue_position)
--       No grant (not even a hand-over) during a quarantine: busy, retry_after the
--       quarantine's end (version 6); a holder's re-acquire still confirms.
--   acquire_relaxed, renew_relaxed, release_relaxed, hand_over_relaxed (version 6):
--       the same functions for ?durability=relaxed, made from the same text (see
--       the DO block): everything commits with synchronous_commit=off, except a
--       call that raises fence_ceiling or max_ttl or recovers the epoch.
--   recover(now) / raise_limits(fence, ttl)  (version 6, see epoch above)
--   renew(names[], tokens[], ttls[]) -> boolean[]  (answers in item order)
--   release(name, token) -> boolean                 (was a live holder; commits with
--       synchronous_commit=off -- see the function -- unless it hands the place
--       over, while a grant by acquire and write_record always commit durably: the
--       fence and version must survive; an acquire that grants nothing commits
--       with synchronous_commit=off too, version 5). Hands free places to the
--       first waiters: they become holders in the same transaction and are sent
--       'wake_key fence' (version 4).
--   break_lease(name) -> integer                    (live holders removed; hands
--       over like release)
--   hand_over(name, now, count, sync)  (used by release and break_lease)
--   holders_of(name) / leases(prefix) -> live holders with held_for/expires_in (s)
--   read_record(key) -> (value, version, now)   (version 0 and NULL value if absent;
--       now: clock_timestamp() as Unix seconds, the time base of every expiry)
--   write_record(key, expected_version, value, ttl) -> bigint   (the new version,
--       NULL if the current version -- 0 when absent -- was not expected_version;
--       a NULL value deletes, a NULL ttl never expires)
--   purge(now)  (called by acquire and write_record now and then: drops long-expired
--               rows of any name or key)
--   schema_version() -> integer
-- acquire, release and break_lease run with enable_seqscan and enable_bitmapscan
-- off (SET clauses, restored when they return): every row they look for is found
-- through an index, and a plain index scan marks the index entries of deleted rows
-- dead as it passes them, so a name acquired and released thousands of times a
-- second never makes them step over thousands of dead rows. (A sequential scan
-- reads them all; a bitmap scan never marks them; either is what the planner picks
-- for a table its statistics call small.)
-- acquire also runs with plan_cache_mode = force_generic_plan (version 8): PostgreSQL
-- chose a custom plan, planned anew on every call, for its general path (the whole
-- state of a name in one statement), which every queued acquire takes: ~200 µs of
-- planning per call under 8-process contention, a quarter of the server's CPU per
-- hand-over (pg_stat_statements: plans = calls). The generic plan uses the same
-- index scans and ran as fast (33 vs 37 µs); every other statement of ours already
-- ran generic plans.
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

-- fillfactor leaves room on each page for the new row versions of renewals.
-- (Until version 3 expires_at was unindexed, so renewals were HOT updates; the
-- expires_at index purge() needs since makes each renewal add index entries,
-- which PostgreSQL 14+ removes early by bottom-up deletion, and vacuum later.)
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
-- Version 4: what a hand-over grants, from the waiter's latest acquire request
-- (NULL in rows queued by version 3: such a hand-over lasts as long as the queue
-- place and names no owner). Adding nullable columns rewrites nothing.
ALTER TABLE waiters ADD COLUMN IF NOT EXISTS owner text,
                    ADD COLUMN IF NOT EXISTS host text,
                    ADD COLUMN IF NOT EXISTS pid integer,
                    ADD COLUMN IF NOT EXISTS ttl double precision;

-- Version 6: the epoch (see the header). The row is made once, with the marker;
-- a re-run of this file over an existing epoch must not refill an emptied
-- marker (that would hide a crash), so the marker is only written here together
-- with a new epoch row.
CREATE TABLE IF NOT EXISTS epoch (
    id               boolean PRIMARY KEY DEFAULT true CHECK (id),
    epoch            bigint NOT NULL,
    fence_ceiling    bigint NOT NULL,
    max_ttl          double precision NOT NULL,
    quarantine_until timestamptz
);
CREATE UNLOGGED TABLE IF NOT EXISTS epoch_marker (
    id               boolean PRIMARY KEY DEFAULT true CHECK (id),
    epoch            bigint NOT NULL,
    fence_ceiling    bigint NOT NULL,
    max_ttl          double precision NOT NULL,
    quarantine_until timestamptz
);
DO $epoch$
BEGIN
    IF NOT EXISTS (SELECT FROM epoch) THEN
        INSERT INTO epoch (epoch, fence_ceiling, max_ttl)
        SELECT 0, s.last_value + 1048576, 0 FROM fence_seq s;
        INSERT INTO epoch_marker SELECT * FROM epoch;
    END IF;
END
$epoch$;

-- Version 2. value is never NULL: writing NULL deletes the row.
CREATE TABLE IF NOT EXISTS records (
    key          text COLLATE "C" PRIMARY KEY,
    value        bytea NOT NULL,
    version      bigint NOT NULL,
    expires_at   timestamptz
) WITH (fillfactor = 70);

-- Version 3: purge() finds expired rows through these indexes instead of scanning.
CREATE INDEX IF NOT EXISTS holders_expires_at ON holders (expires_at);
CREATE INDEX IF NOT EXISTS waiters_expires_at ON waiters (expires_at);
CREATE INDEX IF NOT EXISTS records_expires_at ON records (expires_at)
    WHERE expires_at IS NOT NULL;

-- Version 3 inlines this into its callers (a SQL function with a SET clause is
-- never inlined, and cost more than the rest of a release).
DROP FUNCTION IF EXISTS lock_name(text);
-- Version 4 hands places over (hand_over) instead of only waking waiters.
DROP FUNCTION IF EXISTS wake(text, timestamptz, integer);

CREATE OR REPLACE FUNCTION schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE
AS $$ SELECT 8 $$;

-- Every other function is created by the block below, which writes this schema's
-- name into its text: @schema@ becomes the quoted schema name (every table, sequence
-- and function of ours is qualified with it), @fence_seq@/@waiter_seq@ the
-- sequences' quoted names as literals, @name_lock@/@record_lock@ the first key of
-- the name and record advisory locks (hashtext(schema), hashtext(schema ||
-- ':record')). So no function needs a SET search_path clause (which costs a
-- configuration save, a search path recomputation and a restore on every call,
-- and stops a SQL function from being inlined), and none depends on the caller's
-- search_path: the built-in functions and operators come from pg_catalog, which
-- is searched first unless a caller lists it explicitly after a schema of its
-- own; pg_temp is never searched for them. The SET clauses of acquire, release and
-- break_lease (lock_timeout and the two planner settings, see the header) cost a
-- few microseconds a call; renew and write_record set lock_timeout
-- transaction-locally with set_config(): every call in autocommit mode is its own
-- transaction.
DO $install$
DECLARE
    v_sql text := $functions$

-- Removes rows that expired a while ago under names nobody touches any more
-- (acquire purges the names it is asked for; this bounds the rest). Expired rows
-- are absent to every operation already, so deleting them without the name's lock
-- changes no answer; SKIP LOCKED keeps it from ever waiting. The expires_at
-- indexes (version 3) find the rows without scanning the tables. PL/pgSQL (since
-- version 4) keeps its plans for the session; a SQL function planned them anew
-- on every call.
CREATE OR REPLACE FUNCTION @schema@.purge(p_now timestamptz) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    DELETE FROM @schema@.holders WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM @schema@.holders WHERE expires_at <= p_now - interval '1 minute'
        LIMIT 500 FOR UPDATE SKIP LOCKED));
    DELETE FROM @schema@.waiters WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM @schema@.waiters WHERE expires_at <= p_now - interval '1 minute'
        LIMIT 500 FOR UPDATE SKIP LOCKED));
    DELETE FROM @schema@.records WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM @schema@.records WHERE expires_at <= p_now - interval '1 minute'
        LIMIT 500 FOR UPDATE SKIP LOCKED));
END
$$;

-- Version 6. Called by a grant that found epoch_marker empty: the server went
-- through crash recovery since the marker was written, and commits made with
-- synchronous_commit=off just before the crash may be lost -- grants whose holders
-- saw their fences, renewals their holders count on. One session bumps (the others
-- wait for its row lock, then find the marker it wrote): fence_seq moves up to
-- fence_ceiling, above every fence a relaxed grant handed out; a quarantine of
-- max_ttl starts now. All of it commits durably, with the caller's transaction.
-- Returns the new marker's limits.
CREATE OR REPLACE FUNCTION @schema@.recover(
    p_now timestamptz, OUT fence_ceiling bigint, OUT max_ttl double precision,
    OUT quarantine_until timestamptz)
LANGUAGE plpgsql
AS $$
DECLARE
    v_next bigint;
    v_epoch bigint;
BEGIN
    PERFORM FROM @schema@.epoch e WHERE e.id FOR UPDATE;
    SELECT m.fence_ceiling, m.max_ttl, m.quarantine_until
    INTO fence_ceiling, max_ttl, quarantine_until FROM @schema@.epoch_marker m WHERE m.id;
    IF FOUND THEN
        RETURN;  -- another session recovered while this one waited
    END IF;
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    SELECT greatest(s.last_value, e.fence_ceiling) INTO v_next
    FROM @schema@.fence_seq s, @schema@.epoch e WHERE e.id;
    PERFORM setval(@fence_seq@::regclass, v_next);
    UPDATE @schema@.epoch e
    SET epoch = e.epoch + 1, fence_ceiling = v_next + 1048576,
        quarantine_until = CASE WHEN e.max_ttl > 0
            THEN greatest(e.quarantine_until, p_now + make_interval(secs => e.max_ttl))
            ELSE e.quarantine_until END
    WHERE e.id
    RETURNING e.epoch, e.fence_ceiling, e.max_ttl, e.quarantine_until
    INTO v_epoch, fence_ceiling, max_ttl, quarantine_until;
    INSERT INTO @schema@.epoch_marker SELECT * FROM @schema@.epoch e WHERE e.id;
    RAISE LOG 'leasehold: crash detected in schema %: epoch %, fences from %, no grants until %',
        @schema_literal@, v_epoch, v_next + 1, quarantine_until;
END
$$;

-- Version 6. A relaxed grant whose fence reached fence_ceiling, or a relaxed call
-- asking for a ttl above max_ttl: raise them (both tables) and make the caller's
-- transaction commit durably, so the limit is on disk before its answer is sent.
-- Rare: once per 2^20 fences, and when a longer ttl than ever is asked for.
CREATE OR REPLACE FUNCTION @schema@.raise_limits(
    p_fence bigint, p_ttl double precision, OUT fence_ceiling bigint,
    OUT max_ttl double precision)
LANGUAGE plpgsql
AS $$
BEGIN
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    UPDATE @schema@.epoch e
    SET fence_ceiling = CASE WHEN p_fence >= e.fence_ceiling THEN p_fence + 1048576
                             ELSE e.fence_ceiling END,
        max_ttl = greatest(e.max_ttl, coalesce(p_ttl, 0))
    WHERE e.id
    RETURNING e.fence_ceiling, e.max_ttl INTO fence_ceiling, max_ttl;
    -- No marker row (a crash not yet recovered): recover() copies the new values.
    UPDATE @schema@.epoch_marker m
    SET fence_ceiling = e.fence_ceiling, max_ttl = e.max_ttl
    FROM @schema@.epoch e WHERE e.id AND m.id;
END
$$;

-- The common case, a free name nobody waits for, is one statement after the lock:
-- an INSERT guarded by the state of the name. Anything else (a holder, a queue,
-- expired rows, the token's own grant) takes the general path below.
CREATE OR REPLACE FUNCTION @schema@.acquire@variant@(
    p_name text, p_token text, p_owner text, p_host text, p_pid integer,
    p_ttl double precision, p_limit integer, p_queue_ttl double precision,
    p_channel text, p_wake_key text,
    OUT granted boolean, OUT fence bigint, OUT retry_after double precision,
    OUT queue_position integer)
LANGUAGE plpgsql
SET lock_timeout = '10s' SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_locked text;
    v_now timestamptz;
    v_live integer;
    v_expired integer;
    v_soonest timestamptz;
    v_seq bigint;
    v_ahead integer;
    v_stale integer;
    -- Whether the caller's transaction had written nothing before this call.
    v_own boolean := txid_current_if_assigned() IS NULL;
    v_ceiling bigint;
    v_max_ttl double precision;
    v_quarantine timestamptz;
    v_open boolean;
    -- Set when this call wrote a limit that must commit durably (recover, raise).
    v_keep boolean := false;
BEGIN
    -- Serialises every state change of one name (grants, release, break) for the
    -- rest of the transaction. Transaction-scoped, so it is safe behind
    -- transaction-mode poolers and can never outlive the transaction. (One plain
    -- expression, which PL/pgSQL evaluates without starting the executor.)
    v_locked := pg_advisory_xact_lock(@name_lock@, hashtext(p_name))::text;
    -- Read the clock after the lock: time spent waiting must not shorten the lease.
    v_now := clock_timestamp();
    IF random() < 0.01 THEN
        PERFORM @schema@.purge(v_now);
    END IF;
    IF @relaxed@ THEN
        -- ?durability=relaxed: nothing this call writes waits for its WAL flush
        -- (unless a limit below is raised); the epoch keeps fences increasing and
        -- the quarantine keeps a lost grant's holder alone. A caller's own earlier
        -- writes keep their durability.
        IF v_own THEN
            PERFORM set_config('synchronous_commit', 'off', true);
        END IF;
    ELSIF current_setting('synchronous_commit') = 'off' THEN
        -- A fence handed out must never be handed out again: with
        -- synchronous_commit=off a crash could lose this commit after the client
        -- saw the fence. 'local' and stronger settings are left alone.
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    -- Version 6: a crash since the marker was written is recovered before any
    -- grant (in either durability: a relaxed grant lost in the crash may have
    -- handed out the fences fence_seq would issue next). "WHERE m.id" lets the
    -- primary key serve every read of the one-row tables: with enable_seqscan off
    -- a bare scan is costed at 10^10, which makes PostgreSQL JIT-compile the
    -- query (13 ms a call, measured).
    SELECT m.fence_ceiling, m.max_ttl, m.quarantine_until
    INTO v_ceiling, v_max_ttl, v_quarantine FROM @schema@.epoch_marker m WHERE m.id;
    IF NOT FOUND THEN
        SELECT r.fence_ceiling, r.max_ttl, r.quarantine_until
        INTO v_ceiling, v_max_ttl, v_quarantine FROM @schema@.recover(v_now) r;
        v_keep := true;
    END IF;
    v_open := v_quarantine IS NULL OR v_quarantine <= v_now;
    -- A relaxed call raises the limits at its end (before it returns, in its own
    -- transaction: they commit before the answer is sent), after every row lock it
    -- waits for: the epoch row is the last lock every function takes, so a raise
    -- never waits in a cycle with a renewal or a release.
    -- Every row of the name counts here, expired or not, and the token's own row
    -- counts as all places: then this grants nothing and the general path decides.
    IF p_limit = 1 THEN
        -- A lock, the most common case: the count below is 0 exactly when the name
        -- has no row at all, which two NOT EXISTS probes find without an aggregate
        -- (version 7: an Agg node is set up anew on every execution).
        INSERT INTO @schema@.holders AS h (name, token, owner, host, pid, fence,
                                           holder_limit, granted_at, expires_at)
        SELECT p_name, p_token, p_owner, p_host, p_pid, nextval(@fence_seq@::regclass),
               p_limit, v_now, v_now + make_interval(secs => p_ttl)
        WHERE v_open AND NOT EXISTS (SELECT FROM @schema@.waiters w WHERE w.name = p_name)
          AND NOT EXISTS (SELECT FROM @schema@.holders x WHERE x.name = p_name)
        RETURNING h.fence INTO fence;
    ELSE
        INSERT INTO @schema@.holders AS h (name, token, owner, host, pid, fence,
                                           holder_limit, granted_at, expires_at)
        SELECT p_name, p_token, p_owner, p_host, p_pid, nextval(@fence_seq@::regclass),
               p_limit, v_now, v_now + make_interval(secs => p_ttl)
        WHERE v_open AND NOT EXISTS (SELECT FROM @schema@.waiters w WHERE w.name = p_name)
          AND (SELECT count(*) + p_limit * count(*) FILTER (WHERE x.token = p_token)
               FROM @schema@.holders x WHERE x.name = p_name) < p_limit
        RETURNING h.fence INTO fence;
    END IF;
    IF fence IS NOT NULL THEN
        IF @relaxed@ AND (fence >= v_ceiling OR p_ttl > v_max_ttl) THEN
            PERFORM @schema@.raise_limits(fence, p_ttl);
        END IF;
        granted := true;
        RETURN;
    END IF;

    -- The general path: the whole state of the name in one statement.
    SELECT h.live, h.expired, h.mine, h.soonest, q.seq, q.ahead, q.stale
    INTO v_live, v_expired, fence, v_soonest, v_seq, v_ahead, v_stale
    FROM (
        SELECT count(*) FILTER (WHERE x.expires_at > v_now) AS live,
               count(*) FILTER (WHERE x.expires_at <= v_now) AS expired,
               min(x.fence) FILTER (WHERE x.token = p_token AND x.expires_at > v_now) AS mine,
               min(x.expires_at) FILTER (WHERE x.expires_at > v_now) AS soonest
        FROM @schema@.holders x WHERE x.name = p_name
    ) h, (
        SELECT m.seq,
               count(y.seq) FILTER (WHERE y.expires_at > v_now
                                      AND (m.seq IS NULL OR y.seq < m.seq)) AS ahead,
               count(y.seq) FILTER (WHERE y.expires_at <= v_now) AS stale
        FROM (SELECT (SELECT z.seq FROM @schema@.waiters z
                      WHERE z.name = p_name AND z.token = p_token
                        AND z.expires_at > v_now) AS seq) m
        LEFT JOIN @schema@.waiters y ON y.name = p_name
        GROUP BY m.seq
    ) q;
    IF v_expired > 0 AND fence IS NULL THEN
        -- Blocking on purpose: if a renewal holds the row lock, wait for it and look
        -- again, so a holder renewed in time is never counted as expired.
        DELETE FROM @schema@.holders h WHERE h.name = p_name AND h.expires_at <= v_now;
        SELECT count(*), min(h.expires_at), min(h.fence) FILTER (WHERE h.token = p_token)
        INTO v_live, v_soonest, fence
        FROM @schema@.holders h WHERE h.name = p_name;
    END IF;
    IF fence IS NOT NULL THEN
        -- Already a live holder: a retried acquire whose first answer was lost, or a
        -- waiter confirming a hand-over. Same grant, same fence, a full ttl again.
        UPDATE @schema@.holders h SET expires_at = v_now + make_interval(secs => p_ttl)
        WHERE h.name = p_name AND h.token = p_token;
        IF @relaxed@ AND p_ttl > v_max_ttl THEN
            PERFORM @schema@.raise_limits(NULL, p_ttl);
        END IF;
        granted := true;
        RETURN;
    END IF;
    IF v_stale > 0 THEN
        DELETE FROM @schema@.waiters w WHERE w.name = p_name AND w.expires_at <= v_now;
    END IF;

    IF v_open AND v_live < p_limit AND v_ahead < p_limit - v_live THEN
        INSERT INTO @schema@.holders AS h (name, token, owner, host, pid, fence,
                                           holder_limit, granted_at, expires_at)
        VALUES (p_name, p_token, p_owner, p_host, p_pid, nextval(@fence_seq@::regclass),
                p_limit, v_now, v_now + make_interval(secs => p_ttl))
        RETURNING h.fence INTO fence;
        IF @relaxed@ AND (fence >= v_ceiling OR p_ttl > v_max_ttl) THEN
            PERFORM @schema@.raise_limits(fence, p_ttl);
        END IF;
        IF v_seq IS NOT NULL THEN
            DELETE FROM @schema@.waiters w WHERE w.name = p_name AND w.token = p_token;
        END IF;
        granted := true;
        RETURN;
    END IF;

    granted := false;
    -- Nothing granted: what this transaction wrote (a queue place, expired rows
    -- purged) may be lost in a crash at no risk -- a lost place is asked for again
    -- at the waiter's next refresh, purged rows were absent already -- so the
    -- commit need not wait for its WAL flush. Busy answers are most of what a
    -- contended name sees, and each flush waited for here queued behind the flush
    -- of the release that hands the name over (measured, two processes on one
    -- name: release 530 -> 420 µs, handoff 760 -> 535 µs). A caller's own earlier
    -- writes keep their durability.
    IF v_own AND NOT v_keep THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    -- In a quarantine nothing is granted before its end, whatever expires sooner.
    retry_after := extract(epoch FROM CASE WHEN v_open THEN v_soonest
                                           ELSE greatest(v_soonest, v_quarantine) END
                                      - v_now)::double precision;
    IF v_seq IS NOT NULL THEN
        queue_position := v_ahead;
        IF p_queue_ttl IS NOT NULL THEN
            -- Keeps its place (seq); the channel follows the store that asks now, and
            -- a hand-over grants what this latest request asks for.
            UPDATE @schema@.waiters w
            SET expires_at = v_now + make_interval(secs => p_queue_ttl),
                channel = p_channel, wake_key = p_wake_key, holder_limit = p_limit,
                owner = p_owner, host = p_host, pid = p_pid, ttl = p_ttl
            WHERE w.name = p_name AND w.token = p_token;
        END IF;
    ELSIF p_queue_ttl IS NOT NULL THEN
        INSERT INTO @schema@.waiters (name, token, seq, holder_limit, channel, wake_key,
                                      expires_at, owner, host, pid, ttl)
        VALUES (p_name, p_token, nextval(@waiter_seq@::regclass), p_limit, p_channel,
                p_wake_key, v_now + make_interval(secs => p_queue_ttl), p_owner, p_host,
                p_pid, p_ttl);
        queue_position := v_ahead;
    END IF;
    IF @relaxed@ AND p_queue_ttl IS NOT NULL AND p_ttl > v_max_ttl THEN
        -- A hand-over grants a queued request's ttl.
        PERFORM @schema@.raise_limits(NULL, p_ttl);
    END IF;
END
$$;

-- Answers in item order. Items are renewed 1,000 at a time, so every plan works on
-- a bounded set; an item's answer is set from the ordinals its UPDATE returns,
-- never by looking the item up in the updated rows (version 2 did that with
-- EXISTS over a CTE, which the planner, estimating one row for it, rescanned once
-- per item: quadratic, seconds for 10,000 items, past statement_timeout).
-- Duplicate items get the same answer (within 1,000 items they are grouped into one
-- update with the longest ttl; which ttl wins among duplicates is unspecified).
CREATE OR REPLACE FUNCTION @schema@.renew@variant@(
    p_names text[], p_tokens text[], p_ttls double precision[])
RETURNS boolean[]
LANGUAGE plpgsql
AS $$
DECLARE
    v_max_ttl double precision;
    v_count integer := coalesce(cardinality(p_names), 0);
    v_answers boolean[];
    v_from integer;
    v_to integer;
    v_now timestamptz;
    v_ords integer[];
    v_ord integer;
BEGIN
    IF v_count = 0 THEN
        RETURN '{}';
    END IF;
    PERFORM set_config('lock_timeout', '10s', true);
    IF @relaxed@ AND txid_current_if_assigned() IS NULL THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    v_answers := array_fill(false, ARRAY[v_count]);
    -- Lock the rows in index order first: acquire's purge deletes in that order too,
    -- so a batch renewal and a purge of the same name can never deadlock.
    PERFORM 1
    FROM @schema@.holders h
    JOIN unnest(p_names, p_tokens) AS i(name, token)
      ON h.name = i.name AND h.token = i.token
    ORDER BY h.name, h.token
    FOR UPDATE OF h;
    v_now := clock_timestamp();
    FOR v_from IN 1 .. v_count BY 1000 LOOP
        v_to := least(v_from + 999, v_count);
        FOR v_ords IN
            UPDATE @schema@.holders h SET expires_at = v_now + make_interval(secs => i.ttl)
            FROM (
                SELECT u.name, u.token, max(u.ttl) AS ttl, array_agg(u.ord::integer) AS ords
                FROM unnest(p_names[v_from:v_to], p_tokens[v_from:v_to],
                            p_ttls[v_from:v_to]) WITH ORDINALITY AS u(name, token, ttl, ord)
                GROUP BY u.name, u.token
            ) i
            WHERE h.name = i.name AND h.token = i.token AND h.expires_at > v_now
            RETURNING i.ords
        LOOP
            FOREACH v_ord IN ARRAY v_ords LOOP
                v_answers[v_from - 1 + v_ord] := true;
            END LOOP;
        END LOOP;
    END LOOP;
    IF @relaxed@ THEN
        -- Last, after the row locks (see acquire). No marker: raise anyway.
        SELECT max(t) INTO v_max_ttl FROM unnest(p_ttls) t;
        IF NOT EXISTS (SELECT FROM @schema@.epoch_marker m WHERE m.id AND m.max_ttl >= v_max_ttl) THEN
            PERFORM @schema@.raise_limits(NULL, v_max_ttl);
        END IF;
    END IF;
    RETURN v_answers;
END
$$;

-- Makes the first p_count live waiters of p_name holders, in the caller's
-- transaction, with the name locked: a new fence each, the owner, ttl and limit of
-- the waiter's latest acquire request, expiry min(its queue expiry, now + its ttl)
-- -- so a waiter that died after queueing holds the name at most as long as its
-- queue place would have lasted. Each one that listens is sent 'wake_key fence' on
-- its channel (delivered on commit). p_sync: the caller's synchronous_commit.
CREATE OR REPLACE FUNCTION @schema@.hand_over@variant@(
    p_name text, p_now timestamptz, p_count integer, p_sync text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_set text;
    v_sent bigint;
    v_fence bigint;
    v_ttl double precision;
    v_ceiling bigint;
    v_max_ttl double precision;
    v_quarantine timestamptz;
BEGIN
    -- Grants, so version 6's marker check and quarantine apply (see acquire).
    SELECT m.fence_ceiling, m.max_ttl, m.quarantine_until
    INTO v_ceiling, v_max_ttl, v_quarantine FROM @schema@.epoch_marker m WHERE m.id;
    IF NOT FOUND THEN
        SELECT r.fence_ceiling, r.max_ttl, r.quarantine_until
        INTO v_ceiling, v_max_ttl, v_quarantine FROM @schema@.recover(p_now) r;
    END IF;
    IF v_quarantine > p_now THEN
        RETURN;  -- the waiters come back at the quarantine's end (acquire's retry_after)
    END IF;
    IF NOT @relaxed@ THEN
        -- These are grants: their fences must survive a crash (see acquire). A
        -- caller's own 'local' or stronger setting is kept.
        v_set := set_config('synchronous_commit',
                            CASE WHEN p_sync = 'off' THEN 'on' ELSE p_sync END, true);
    END IF;
    WITH head AS (
        SELECT w.token FROM @schema@.waiters w
        WHERE w.name = p_name AND w.expires_at > p_now
        ORDER BY w.seq
        LIMIT p_count
    ), moved AS (
        DELETE FROM @schema@.waiters w USING head
        WHERE w.name = p_name AND w.token = head.token
        RETURNING w.token, w.seq, w.owner, w.host, w.pid, w.ttl, w.holder_limit,
                  w.channel, w.wake_key, w.expires_at
    ), fenced AS (
        SELECT m.*, nextval(@fence_seq@::regclass) AS fence
        FROM (SELECT * FROM moved ORDER BY seq) m
    ), granted AS (
        INSERT INTO @schema@.holders (name, token, owner, host, pid, fence, holder_limit,
                                      granted_at, expires_at)
        SELECT p_name, f.token, coalesce(f.owner, ''), coalesce(f.host, ''),
               coalesce(f.pid, 0), f.fence, f.holder_limit, p_now,
               CASE WHEN f.ttl IS NULL THEN f.expires_at  -- queued by schema version 3
                    ELSE least(f.expires_at, p_now + make_interval(secs => f.ttl)) END
        FROM fenced f
    )
    SELECT (SELECT count(pg_notify(f.channel, f.wake_key || ' ' || f.fence))
            FROM fenced f WHERE f.channel IS NOT NULL),
           (SELECT max(f.fence) FROM fenced f),
           (SELECT max(coalesce(f.ttl, extract(epoch FROM f.expires_at - p_now)))
            FROM fenced f)
    INTO v_sent, v_fence, v_ttl;
    IF @relaxed@ AND (v_fence >= v_ceiling OR v_ttl > v_max_ttl) THEN
        PERFORM @schema@.raise_limits(v_fence, v_ttl);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION @schema@.release@variant@(p_name text, p_token text)
RETURNS boolean
LANGUAGE plpgsql
SET lock_timeout = '10s' SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
DECLARE
    v_sync text := current_setting('synchronous_commit');
    v_locked text;
    v_now timestamptz;
    v_live boolean;
    v_head_limit integer;
    v_others integer;
BEGIN
    -- A release need not wait for its WAL flush: losing it in a crash (or a failover
    -- without synchronous replication) only brings the lease back until it expires,
    -- and hands out nothing. Whatever acts on it durably -- the grant to the next
    -- holder -- commits later in the WAL, so flushing that flushes the release too.
    -- Only when this transaction has written nothing yet: a caller's own earlier
    -- writes keep their durability. (A hand-over is a grant and switches it back.)
    v_locked := set_config('synchronous_commit',
                           CASE WHEN txid_current_if_assigned() IS NULL THEN 'off'
                                ELSE v_sync END, true)
                || pg_advisory_xact_lock(@name_lock@, hashtext(p_name))::text;
    v_now := clock_timestamp();
    DELETE FROM @schema@.holders h WHERE h.name = p_name AND h.token = p_token
    RETURNING h.expires_at > v_now INTO v_live;
    IF v_live IS NULL THEN
        -- Not a holder: perhaps a waiter giving up (a grant always leaves the queue).
        DELETE FROM @schema@.waiters w WHERE w.name = p_name AND w.token = p_token;
    END IF;
    -- The head of the queue and, only if there is one, the places the other holders
    -- take -- expired ones too: a conservative count, and their waiters come back at
    -- that expiry by themselves (acquire's retry_after). Two statements since
    -- version 7: nobody waiting, the count's aggregate is not even set up.
    SELECT w.holder_limit INTO v_head_limit
    FROM @schema@.waiters w WHERE w.name = p_name AND w.expires_at > v_now
    ORDER BY w.seq LIMIT 1;
    IF v_head_limit IS NOT NULL THEN
        SELECT count(*) INTO v_others FROM @schema@.holders x WHERE x.name = p_name;
        IF v_head_limit > v_others THEN
            PERFORM @schema@.hand_over@variant@(p_name, v_now, v_head_limit - v_others,
                                                v_sync);
        END IF;
    END IF;
    RETURN coalesce(v_live, false);
END
$$;

CREATE OR REPLACE FUNCTION @schema@.break_lease(p_name text) RETURNS integer
LANGUAGE plpgsql
SET lock_timeout = '10s' SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
DECLARE
    v_locked text;
    v_now timestamptz;
    v_count integer;
    v_head_limit integer;
BEGIN
    v_locked := pg_advisory_xact_lock(@name_lock@, hashtext(p_name))::text;
    v_now := clock_timestamp();
    WITH gone AS (
        DELETE FROM @schema@.holders h WHERE h.name = p_name
        RETURNING h.expires_at > v_now AS live
    )
    SELECT count(*) FILTER (WHERE g.live) INTO v_count FROM gone g;
    SELECT w.holder_limit INTO v_head_limit
    FROM @schema@.waiters w WHERE w.name = p_name AND w.expires_at > v_now
    ORDER BY w.seq LIMIT 1;
    IF v_head_limit IS NOT NULL THEN
        PERFORM @schema@.hand_over(p_name, v_now, v_head_limit,
                                   current_setting('synchronous_commit'));
    END IF;
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION @schema@.holders_of(p_name text)
RETURNS TABLE (name text, owner text, host text, pid integer, fence bigint,
               holder_limit integer, held_for double precision,
               expires_in double precision)
LANGUAGE sql
AS $$
    SELECT h.name, h.owner, h.host, h.pid, h.fence, h.holder_limit,
           greatest(extract(epoch FROM c.now - h.granted_at), 0)::double precision,
           extract(epoch FROM h.expires_at - c.now)::double precision
    FROM (SELECT clock_timestamp() AS now) c
    JOIN @schema@.holders h ON h.name = p_name AND h.expires_at > c.now
    ORDER BY h.fence
$$;

-- starts_with() instead of LIKE: no wildcard escaping to get wrong. The range
-- condition (byte order, the columns are COLLATE "C") lets the primary key index
-- find the first candidate.
CREATE OR REPLACE FUNCTION @schema@.leases(p_prefix text)
RETURNS TABLE (name text, owner text, host text, pid integer, fence bigint,
               holder_limit integer, held_for double precision,
               expires_in double precision)
LANGUAGE sql
AS $$
    SELECT h.name, h.owner, h.host, h.pid, h.fence, h.holder_limit,
           greatest(extract(epoch FROM c.now - h.granted_at), 0)::double precision,
           extract(epoch FROM h.expires_at - c.now)::double precision
    FROM (SELECT clock_timestamp() AS now) c
    JOIN @schema@.holders h ON h.name >= p_prefix AND starts_with(h.name, p_prefix)
                            AND h.expires_at > c.now
    ORDER BY h.name, h.fence
$$;

-- The store's clock for records: the same clock_timestamp() every expiry is written
-- and compared with, as Unix seconds (what server_time() reports too).
CREATE OR REPLACE FUNCTION @schema@.read_record(
    p_key text, OUT value bytea, OUT version bigint, OUT now double precision)
LANGUAGE sql
AS $$
    SELECT r.value, coalesce(r.version, 0), extract(epoch FROM c.now)::double precision
    FROM (SELECT clock_timestamp() AS now) c
    LEFT JOIN @schema@.records r
           ON r.key = p_key AND (r.expires_at IS NULL OR r.expires_at > c.now)
$$;

-- Compare-and-set. Writes of one key are serialised by a transaction-level advisory
-- lock (an absent key has no row to lock), in a key space of its own, so records
-- never wait for lease names.
CREATE OR REPLACE FUNCTION @schema@.write_record(
    p_key text, p_expected bigint, p_value bytea, p_ttl double precision)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_now timestamptz;
    v_current bigint;
    v_version bigint;
BEGIN
    PERFORM set_config('lock_timeout', '10s', true);
    PERFORM pg_advisory_xact_lock(@record_lock@, hashtext(p_key));
    -- Read the clock after the lock: time spent waiting must not shorten the ttl.
    v_now := clock_timestamp();
    -- Blocking on purpose, like acquire: a purge holding the row is waited for.
    DELETE FROM @schema@.records r WHERE r.key = p_key AND r.expires_at <= v_now;
    IF random() < 0.01 THEN
        PERFORM @schema@.purge(v_now);
    END IF;
    SELECT r.version INTO v_current FROM @schema@.records r WHERE r.key = p_key;
    IF coalesce(v_current, 0) <> p_expected THEN
        RETURN NULL;
    END IF;
    -- A version handed out must never be handed out again (see acquire).
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    v_version := nextval(@fence_seq@::regclass);
    IF p_value IS NULL THEN
        DELETE FROM @schema@.records r WHERE r.key = p_key;
    ELSE
        INSERT INTO @schema@.records AS r (key, value, version, expires_at)
        VALUES (p_key, p_value, v_version,
                v_now + make_interval(secs => p_ttl))
        ON CONFLICT (key) DO UPDATE
        SET value = excluded.value, version = excluded.version,
            expires_at = excluded.expires_at;
    END IF;
    RETURN v_version;
END
$$;

$functions$;
    v_schema text := current_schema();
BEGIN
    v_sql := replace(v_sql, '@schema@', quote_ident(v_schema));
    v_sql := replace(v_sql, '@fence_seq@', quote_literal(quote_ident(v_schema) || '.fence_seq'));
    v_sql := replace(v_sql, '@waiter_seq@', quote_literal(quote_ident(v_schema) || '.waiter_seq'));
    v_sql := replace(v_sql, '@name_lock@', hashtext(v_schema)::text);
    v_sql := replace(v_sql, '@record_lock@', hashtext(v_schema || ':record')::text);
    v_sql := replace(v_sql, '@schema_literal@', quote_literal(v_schema));
    -- Twice: functions named with @variant@ are made once per durability (version
    -- 6: acquire, renew, hand_over, release and their *_relaxed twins, which see
    -- @relaxed@ as true); the others are simply replaced twice by the same text.
    EXECUTE replace(replace(v_sql, '@variant@', ''), '@relaxed@', 'false');
    EXECUTE replace(replace(v_sql, '@variant@', '_relaxed'), '@relaxed@', 'true');
END
$install$;

-- leasehold:end
SELECT set_config('search_path', current_setting('leasehold.saved_search_path'), false);
