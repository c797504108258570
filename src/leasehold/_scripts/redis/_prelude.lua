-- _prelude.lua: helpers shared by the lease scripts. The store prepends this file
-- to acquire/renew/release/holders/leases/break before loading them (Redis Lua has
-- no `require`), so each loaded script stays one self-contained EVALSHA.
--
-- KEYS, ARGV, returns: none of its own; see each script's header.
--
-- Conventions every script follows:
-- * Times are microseconds on the Redis server's clock (TIME). Lua numbers are
--   doubles, exact for integers below 2^53 (until the year 2255 in microseconds).
-- * A holder is live while its expiry > now; a waiter while its queue expiry > now.
-- * Numbers that are stored as text or passed to commands go through fmt(), because
--   Lua's tostring() would write 1.7e+15.
-- * Per-name keys (holders, state, queue, queue expiry) share one hash tag with
--   their bucket's fence floor and name index, so every script touches one slot.
--   Signal lists (prefix .. token) are built here from the name's signal prefix;
--   they carry the same hash tag, so they live in that slot too.

local GRACE_MS = 1000 -- keys outlive the last expiry they hold by this much

local function fmt(n)
    return string.format('%.0f', n)
end

local function now_us()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The id of the running server process, read with INFO (about 18 µs of server
-- time). It changes on every restart and differs on a promoted replica, which is how
-- a grant made before a restart or failover is recognised afterwards (its renewal
-- may have been lost, so it must not renew). Only renew.lua calls it, once per
-- batch: grants are stamped with the id the client read on its connection (ARGV),
-- and renew.lua compares stamps with this, the truth, so a stale stamp can only
-- make a renewal fail, never let a pre-restart grant renew.
local function server_run_id()
    return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
end

-- Holder metadata, one hash field per holder:
-- "<fence> <acquired_us> <limit> <run_id> <holder json>"
local function make_meta(fence, acquired, limit, run_id, holder)
    return fmt(fence) .. ' ' .. fmt(acquired) .. ' ' .. fmt(limit) .. ' ' .. run_id .. ' ' .. holder
end

local function parse_meta(meta)
    local fence, acquired, limit, run_id, holder =
        string.match(meta, '^(%d+) (%d+) (%d+) (%x*) (.*)$')
    return fence, acquired, limit, run_id, holder
end

local function ttl_ms(expiry, now)
    return math.ceil((expiry - now) / 1000) + GRACE_MS
end

-- Make `key` live for at least `ms` more milliseconds; never shortens a TTL, and a
-- key without a TTL (just created) always gets one. PEXPIRE ... GT needs Redis 7.0;
-- GT treats a key without a TTL as never expiring, hence the NX fallback (which
-- also does nothing to a missing key).
local function keep_alive(key, ms)
    if redis.call('PEXPIRE', key, fmt(ms), 'GT') == 0 then
        redis.call('PEXPIRE', key, fmt(ms), 'NX')
    end
end

-- The keys and names of one lease name, in the order acquire/release/break take them.
local function name_keys()
    return {
        holders = KEYS[1], -- zset: token -> expiry_us
        -- hash: 'limit' -> last requested limit, 'm:'..token -> meta,
        -- 'w:'..token -> "<limit> <holder json>" of a queued waiter (for hand_over)
        state = KEYS[2],
        queue = KEYS[3], -- zset: token -> arrival (strictly increasing per name)
        queue_expiry = KEYS[4], -- zset: token -> queue expiry_us
        floor = KEYS[5], -- string: highest fence issued in this bucket
        index = KEYS[6], -- zset: name -> latest holder expiry_us (for leases())
        name = ARGV[1],
        signal_prefix = ARGV[2], -- signal list of a waiter: signal_prefix .. token
    }
end


-- The next fence of the name's bucket: max(floor + 1, now), recorded as the floor.
local function next_fence(k, now)
    local floor = tonumber(redis.call('GET', k.floor) or '0')
    local fence = math.max(floor + 1, now)
    redis.call('SET', k.floor, fmt(fence))
    return fence
end

-- Drop expired holders; returns the number of live holders left. Costs one ZCARD
-- when nobody holds the name.
local function purge_holders(k, now)
    local held = redis.call('ZCARD', k.holders)
    if held == 0 then
        return 0
    end
    for _, token in ipairs(redis.call('ZRANGEBYSCORE', k.holders, '-inf', fmt(now))) do
        redis.call('ZREM', k.holders, token)
        redis.call('HDEL', k.state, 'm:' .. token)
        -- A hand-over that its waiter never took up leaves its grant signal behind.
        redis.call('DEL', k.signal_prefix .. token)
        held = held - 1
    end
    return held
end

-- Drop expired waiters; returns the number of live waiters left. Costs one ZCARD
-- when nobody waits, which is the common case.
local function purge_queue(k, now)
    local waiting = redis.call('ZCARD', k.queue_expiry)
    if waiting == 0 then
        return 0
    end
    for _, token in ipairs(redis.call('ZRANGEBYSCORE', k.queue_expiry, '-inf', fmt(now))) do
        redis.call('ZREM', k.queue, token)
        redis.call('ZREM', k.queue_expiry, token)
        redis.call('HDEL', k.state, 'w:' .. token)
        redis.call('DEL', k.signal_prefix .. token)
        waiting = waiting - 1
    end
    return waiting
end

-- Signal the first `free` waiters (the ones that could be granted now), so a
-- release wakes one waiter of a lock, never the whole queue. A waiter that already
-- has a signal pending is not signalled twice (the list holds at most one element).
-- The signal outlives the waiter's queue entry only briefly.
local function wake(k, now, free)
    if free <= 0 then
        return 0
    end
    local woken = 0
    for _, token in ipairs(redis.call('ZRANGE', k.queue, 0, free - 1)) do
        local signal = k.signal_prefix .. token
        if redis.call('EXISTS', signal) == 0 then
            local expiry = tonumber(redis.call('ZSCORE', k.queue_expiry, token) or now)
            redis.call('LPUSH', signal, '1')
            redis.call('PEXPIRE', signal, fmt(ttl_ms(expiry, now)))
            woken = woken + 1
        end
    end
    return woken
end

-- Hand free places to the first waiters (release.lua): each becomes a *provisional*
-- holder in the same atomic step, with a new fence, an empty run id and the expiry
-- of its queue place, and its signal list gets "g <fence>". The waiter's next
-- acquire (which the contract makes every woken waiter run) finds itself holder:
-- the cheap holder path confirms the grant (expiry now + ttl, this server's run id).
-- Until then the grant cannot be renewed (empty run id), does not count as held for
-- release(), and a waiter that died or gave up blocks the name no longer than its
-- queue place would have. Waiters queued by an older leasehold (no 'w:' field) are
-- only woken, as before. Returns the number of waiters left.
local function hand_over(k, now, waiting)
    local held = redis.call('ZCARD', k.holders)
    while waiting > 0 do
        local head = redis.call('ZRANGE', k.queue, 0, 0)[1]
        local info = redis.call('HGET', k.state, 'w:' .. head)
        local limit, holder = nil, nil
        if info then
            limit, holder = string.match(info, '^(%d+) (.*)$')
        end
        if not limit then
            wake(k, now, tonumber(redis.call('HGET', k.state, 'limit') or '1') - held)
            return waiting
        end
        if held >= tonumber(limit) then
            return waiting
        end
        local expiry = tonumber(redis.call('ZSCORE', k.queue_expiry, head))
        local signal = k.signal_prefix .. head
        local fence = next_fence(k, now)
        redis.call('ZADD', k.holders, fmt(expiry), head)
        redis.call('HSET', k.state, 'm:' .. head, make_meta(fence, now, tonumber(limit), '', holder))
        redis.call('HDEL', k.state, 'w:' .. head)
        redis.call('ZREM', k.queue, head)
        redis.call('ZREM', k.queue_expiry, head)
        redis.call('DEL', signal)
        redis.call('LPUSH', signal, 'g ' .. fmt(fence))
        redis.call('PEXPIRE', signal, fmt(ttl_ms(expiry, now)))
        held = held + 1
        waiting = waiting - 1
    end
    return waiting
end

-- After a write: give the name's keys TTLs that cover every expiry they hold (so a
-- name whose holders all crashed disappears by itself), keep the name index in step,
-- and delete the state hash once nothing is held or queued. `waiting` is the number
-- of live waiters (0: the queue keys are gone). The per-name keys hold only this
-- name's entries, so their TTL is set exactly from the latest expiry in them; the
-- bucket's index is shared by many names and only ever extended. `holders_until`:
-- the latest holder expiry when the caller knows it (nil: look it up).
local function settle(k, now, waiting, holders_until)
    if not holders_until then
        local top_holder = redis.call('ZRANGE', k.holders, -1, -1, 'WITHSCORES')
        holders_until = top_holder[2] and tonumber(top_holder[2])
    end
    local queue_until = nil
    if waiting > 0 then
        local top_waiter = redis.call('ZRANGE', k.queue_expiry, -1, -1, 'WITHSCORES')
        queue_until = top_waiter[2] and tonumber(top_waiter[2])
    end
    if holders_until then
        local ms = ttl_ms(holders_until, now)
        redis.call('PEXPIRE', k.holders, fmt(ms))
        redis.call('ZREMRANGEBYSCORE', k.index, '-inf', fmt(now))
        redis.call('ZADD', k.index, 'GT', fmt(holders_until), k.name)
        keep_alive(k.index, ms)
    else
        redis.call('ZREM', k.index, k.name)
    end
    if queue_until then
        local ms = fmt(ttl_ms(queue_until, now))
        redis.call('PEXPIRE', k.queue, ms)
        redis.call('PEXPIRE', k.queue_expiry, ms)
    end
    if holders_until or queue_until then
        local ms = ttl_ms(math.max(holders_until or 0, queue_until or 0), now)
        redis.call('PEXPIRE', k.state, fmt(ms))
    else
        redis.call('DEL', k.state)
    end
end
