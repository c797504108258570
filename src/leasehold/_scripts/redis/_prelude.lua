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

-- The id of the running server process. It changes on every restart and differs
-- on a promoted replica, which is how a grant made before a restart or failover is
-- recognised afterwards (its renewal may have been lost, so it must not renew).
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

-- Make `key` live for at least `ms` more milliseconds; never shortens a TTL.
-- A key without a TTL (-1: just created) always gets one.
local function keep_alive(key, ms)
    local current = redis.call('PTTL', key)
    if current == -2 then
        return
    end
    if current == -1 or current < ms then
        redis.call('PEXPIRE', key, fmt(ms))
    end
end

-- The keys and names of one lease name, in the order acquire/release/break take them.
local function name_keys()
    return {
        holders = KEYS[1], -- zset: token -> expiry_us
        state = KEYS[2], -- hash: 'limit' -> last requested limit, 'm:'..token -> meta
        queue = KEYS[3], -- zset: token -> arrival (strictly increasing per name)
        queue_expiry = KEYS[4], -- zset: token -> queue expiry_us
        floor = KEYS[5], -- string: highest fence issued in this bucket
        index = KEYS[6], -- zset: name -> latest holder expiry_us (for leases())
        name = ARGV[1],
        signal_prefix = ARGV[2], -- signal list of a waiter: signal_prefix .. token
    }
end

-- Drop expired holders and waiters (and stale index entries of the bucket).
local function purge(k, now)
    local bound = fmt(now)
    for _, token in ipairs(redis.call('ZRANGEBYSCORE', k.holders, '-inf', bound)) do
        redis.call('ZREM', k.holders, token)
        redis.call('HDEL', k.state, 'm:' .. token)
    end
    for _, token in ipairs(redis.call('ZRANGEBYSCORE', k.queue_expiry, '-inf', bound)) do
        redis.call('ZREM', k.queue, token)
        redis.call('ZREM', k.queue_expiry, token)
        redis.call('DEL', k.signal_prefix .. token)
    end
    redis.call('ZREMRANGEBYSCORE', k.index, '-inf', bound)
end

-- Signal the first waiters that could be granted now: as many as there are free
-- places, so a release wakes one waiter of a lock, never the whole queue. A waiter
-- that already has a signal pending is not signalled twice (the list holds at
-- most one element). The signal outlives the waiter's queue entry only briefly.
local function wake(k, now)
    local limit = tonumber(redis.call('HGET', k.state, 'limit') or '1')
    local free = limit - redis.call('ZCARD', k.holders)
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

-- After a write: give the name's keys TTLs that cover every expiry they hold (so a
-- name whose holders all crashed disappears by itself), keep the name index in step,
-- and delete the state hash once nothing is held or queued.
local function settle(k, now)
    local top_holder = redis.call('ZRANGE', k.holders, -1, -1, 'WITHSCORES')
    local top_waiter = redis.call('ZRANGE', k.queue_expiry, -1, -1, 'WITHSCORES')
    local holders_until = top_holder[2] and tonumber(top_holder[2])
    local queue_until = top_waiter[2] and tonumber(top_waiter[2])
    if holders_until then
        local ms = ttl_ms(holders_until, now)
        keep_alive(k.holders, ms)
        redis.call('ZADD', k.index, 'GT', fmt(holders_until), k.name)
        keep_alive(k.index, ms)
    else
        redis.call('ZREM', k.index, k.name)
    end
    if queue_until then
        local ms = ttl_ms(queue_until, now)
        keep_alive(k.queue, ms)
        keep_alive(k.queue_expiry, ms)
    end
    if holders_until or queue_until then
        keep_alive(k.state, ttl_ms(math.max(holders_until or 0, queue_until or 0), now))
    else
        redis.call('DEL', k.state)
    end
end
