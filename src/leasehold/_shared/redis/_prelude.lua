-- _prelude.lua: helpers shared by the lease scripts. Redis Lua has no `require`:
-- the store loads this file once at the head of a function library whose
-- functions are the scripts (FCALL), or prepends it to each script it loads as a
-- script (EVALSHA; see redis/scripts.py).
--
-- KEYS, ARGV, returns: none of its own; see each script's header.
--
-- Conventions every script follows:
-- * Times are microseconds on the Redis server's clock (TIME). Lua numbers are
--   doubles, exact for integers below 2^53 (until the year 2255 in microseconds).
-- * A holder is live while its expiry > now; a waiter while its queue expiry > now.
-- * Microsecond times and fences that are stored as text or passed to commands go
--   through fmt(), because Lua's tostring() would write 1.7e+15 (it keeps 14
--   digits). Every value fmt() gets is integral, so it formats with %d (a C long:
--   exact to 2^63), not %.0f: glibc prints a double the slow way. fmt() runs twice
--   in an uncontended acquire + release; %d saved 6,000 of the 239,000
--   instructions the two scripts cost Redis (callgrind, 2.5 %). Milliseconds
--   (TTLs) are small integers and are passed as they are.
-- * Every command a script runs costs about a microsecond of server time on top of
--   its own work (the scripting layer), more than most of the commands themselves:
--   an uncontended acquire runs 6, a release 4 (see docs/backends.md).
-- * A name's holders are ONE key, a MessagePack value read with one GET and written
--   with one SET (plus its PX): a script costs a handful of commands, not dozens.
--   cmsgpack stores integral numbers as integers, so microsecond times round-trip
--   exactly. Its waiters live in zsets and a hash instead, so that a long queue
--   (a fleet of processes waiting for one name) costs O(log n) per operation, not
--   a decode and re-encode of every waiter.
-- * The name's keys share one hash tag with its bucket's fence floor and name
--   index, so every script touches one slot. Signal lists (signal prefix .. token)
--   carry the same hash tag, so they live in that slot too.
--
-- The holders of a name: {limit_hint, holders, index_covered}, holders in grant
--   order; index_covered (absent until set): the bucket's name index lists the
--   name with a score, and keeps a TTL, covering at least this time (see
--   cover_index). Each holder is
--   {token, expiry_us, fence, acquired_us, limit, run_id, holder_json, handed}
--   handed = 1 while a hand-over's signal may still sit in the waiter's list.
-- Its waiters: queue zset (token -> arrival, strictly increasing), queue expiry zset
-- (token -> queue expiry_us), info hash (token -> "<limit> <ttl_us> <holder json>":
-- the latest request, which a hand-over grants).

local GRACE_MS = 1000 -- keys outlive the last expiry they hold by this much

-- Field positions (Lua arrays are 1-based).
local H_TOKEN, H_EXPIRY, H_FENCE, H_ACQUIRED, H_LIMIT, H_RUN, H_HOLDER, H_HANDED = 1, 2, 3, 4, 5, 6, 7, 8

local function fmt(n)
    return string.format('%d', n)
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

-- Holder metadata as holders.lua and leases.lua report it:
-- "<fence> <acquired_us> <limit> <run_id> <holder json>"
local function meta_of(h)
    return fmt(h[H_FENCE]) .. ' ' .. fmt(h[H_ACQUIRED]) .. ' ' .. fmt(h[H_LIMIT]) .. ' '
        .. h[H_RUN] .. ' ' .. h[H_HOLDER]
end

local function ttl_ms(expiry, now)
    return math.ceil((expiry - now) / 1000) + GRACE_MS
end

-- Make `key` live for at least `ms` more milliseconds; never shortens a TTL, and a
-- key without a TTL (just created) always gets one. PEXPIRE ... GT needs Redis 7.0;
-- GT treats a key without a TTL as never expiring, hence the NX fallback (which
-- also does nothing to a missing key).
local function keep_alive(key, ms)
    if redis.call('PEXPIRE', key, ms, 'GT') == 0 then
        redis.call('PEXPIRE', key, ms, 'NX')
    end
end

-- The keys and names of one lease name, in the order acquire/release/break take them
-- (their KEYS and ARGV: passed in, since a function gets them as parameters).
local function name_keys(keys, argv)
    return {
        state = keys[1], -- string: the MessagePack holders above
        floor = keys[2], -- string: highest fence issued in this bucket
        index = keys[3], -- zset: name -> latest holder expiry_us (for leases())
        queue = keys[4], -- zset: token -> arrival
        queue_expiry = keys[5], -- zset: token -> queue expiry_us
        queue_info = keys[6], -- hash: token -> "<limit> <ttl_us> <holder json>"
        name = argv[1],
        signal_prefix = argv[2], -- signal list of a waiter: signal_prefix .. token
    }
end

-- The holders (see above), and whether the key existed.
local function load(key)
    local raw = redis.call('GET', key)
    if not raw then
        return {1, {}}, false
    end
    return cmsgpack.unpack(raw), true
end

-- Drop expired holders, in place; true if any went. Only a hand-over has a signal
-- list (waiters are never signalled otherwise); one its waiter never collected
-- goes with the grant instead of lingering until its own TTL.
local function purge(s, k, now)
    local kept, dropped = {}, false
    for _, h in ipairs(s[2]) do
        if h[H_EXPIRY] > now then
            kept[#kept + 1] = h
        else
            dropped = true
            if h[H_HANDED] == 1 then
                redis.call('DEL', k.signal_prefix .. h[H_TOKEN])
            end
        end
    end
    s[2] = kept
    return dropped
end

local function unqueue(k, token)
    redis.call('ZREM', k.queue, token)
    redis.call('ZREM', k.queue_expiry, token)
    redis.call('HDEL', k.queue_info, token)
end

-- Drop expired waiters; returns the number of live waiters left and whether any
-- went. Costs one ZCARD when nobody waits, which is the common case.
local function purge_queue(k, now)
    local waiting = redis.call('ZCARD', k.queue_expiry)
    if waiting == 0 then
        return 0, false
    end
    local expired = redis.call('ZRANGEBYSCORE', k.queue_expiry, '-inf', fmt(now))
    for _, token in ipairs(expired) do
        unqueue(k, token)
        waiting = waiting - 1
    end
    return waiting, #expired > 0
end

-- For a script that needs to know only whether anyone waits, not how many (release):
-- one command when nobody's place has expired, by looking at the earliest queue
-- expiry alone; purge_queue (two) only when one has. A large count stands for
-- "some" (finite, so that taking one off shows): hand_over stops when the queue
-- runs out.
local function any_waiting(k, now)
    local first = redis.call('ZRANGE', k.queue_expiry, 0, 0, 'WITHSCORES')
    if #first == 0 then
        return 0
    end
    if tonumber(first[2]) <= now then
        return (purge_queue(k, now))
    end
    return 2 ^ 40
end

-- Make the queue keys live at least until `until_us` (the queue expiry of a waiter
-- just queued or refreshed) plus the grace. Every entry passes here when it is
-- added or moved later, so the keys' TTLs always cover every entry in them, and
-- an entry leaving needs no TTL change: Redis deletes empty zsets and hashes, and
-- a TTL longer than the rest needs only keeps them a little longer (scripts that
-- only remove or hand over waiters run no TTL commands). `fresh`: nobody was
-- queued, so the keys were just created and have no TTL yet; otherwise they have
-- one (given in the script that created them), which GT only ever raises. The
-- three keys always get their TTLs together, so one PTTL tells whether they
-- cover `until_us` already; when they do not, they are given `slack_us` more
-- (the waiter's queue ttl): the waiters queued after it, whose places end a
-- little later each, then cost that one PTTL instead of three PEXPIREs, and an
-- abandoned queue outlives its last entry by at most that much more.
local function cover_queue(k, until_us, now, fresh, slack_us)
    if not fresh and redis.call('PTTL', k.queue_expiry) >= ttl_ms(until_us, now) then
        return
    end
    local ms = ttl_ms(until_us + slack_us, now)
    local only_raise = fresh and {} or {'GT'}
    redis.call('PEXPIRE', k.queue, ms, unpack(only_raise))
    redis.call('PEXPIRE', k.queue_expiry, ms, unpack(only_raise))
    redis.call('PEXPIRE', k.queue_info, ms, unpack(only_raise))
end

local function find(list, token)
    for i, entry in ipairs(list) do
        if entry[1] == token then
            return i
        end
    end
    return nil
end

-- The next fence of the name's bucket: max(floor + 1, now), recorded as the floor.
-- One command in the common case (the floor is behind the clock): SET ... GET
-- records `now` and returns the floor it replaced; only when that floor was not
-- behind `now` (fences drawn in the same microsecond, a clock stepped back) is
-- floor + 1 recorded instead, in the same atomic script.
local function next_fence(k, now)
    local floor = tonumber(redis.call('SET', k.floor, fmt(now), 'GET') or '0')
    if floor < now then
        return now
    end
    local fence = floor + 1
    redis.call('SET', k.floor, fmt(fence))
    return fence
end

-- Hand free places to the first waiters, in the same atomic step: each becomes a
-- holder with a new fence, the holder record, limit and ttl of its latest queued
-- request, `run_id` (the calling client's reading of it; see renew.lua: a stale
-- one can only make renewals fail) and expiry min(queue expiry, now + ttl). Its
-- signal list gets "h <fence>", so its wait() returns the grant and no second call
-- is needed (AsyncStore.release/wait). Until its first renewal the grant runs on
-- the waiter's queue place, so a waiter that died or gave up blocks the name no
-- longer than its queue place would have. `caller`, when it is handed a place, is
-- answered directly instead (acquire.lua). Stops at the first waiter whose own
-- limit leaves no place (FIFO: nobody overtakes it here). Returns the latest
-- expiry it granted (or nil) and the number of waiters left.
local function hand_over(s, k, now, run_id, caller, waiting)
    local holders = s[2]
    local latest = nil
    local heads, infos, next_head = {}, {}, 1
    while waiting > 0 do
        if next_head > #heads then
            -- The queue's first two waiters at once: a lock handed to the first
            -- learns from the second's limit that no place is left, with no more
            -- commands. Nothing else changes the queue meanwhile, and every
            -- waiter looked at leaves it (granted or unreadable) or ends the loop.
            heads = redis.call('ZRANGE', k.queue, 0, 1)
            if #heads == 0 then
                break
            end
            infos = redis.call('HMGET', k.queue_info, unpack(heads))
            next_head = 1
        end
        local token, info = heads[next_head], infos[next_head]
        next_head = next_head + 1
        local limit, ttl, holder = nil, nil, nil
        if info then
            limit, ttl, holder = string.match(info, '^(%d+) (%d+) (.*)$')
        end
        if not limit then
            unqueue(k, token) -- unreadable: it asks again and is queued anew
        else
            limit = tonumber(limit)
            if #holders >= limit then
                break
            end
            local queued_until = tonumber(redis.call('ZSCORE', k.queue_expiry, token))
            local expiry = math.min(queued_until, now + tonumber(ttl))
            local fence = next_fence(k, now)
            local handed = 0
            unqueue(k, token)
            if token ~= caller then
                local signal = k.signal_prefix .. token
                redis.call('LPUSH', signal, 'h ' .. fmt(fence))
                redis.call('PEXPIRE', signal, fmt(ttl_ms(expiry, now)))
                handed = 1
            end
            holders[#holders + 1] = {token, expiry, fence, now, limit, run_id, holder, handed}
            latest = math.max(latest or 0, expiry)
        end
        waiting = waiting - 1
    end
    return latest, waiting
end

-- Keep the bucket's name index in step with a grant or renewal: the name stays
-- listed (for leases()) until `expiry`. Entries of names whose holders are gone are
-- dropped as their scores pass, so the index stays as small as what was held
-- lately (about the last two ttls).
-- Fewest commands for the common cases: a name listed already only raises its score
-- and the key's TTL (the key has one: every script that creates it gives it one in
-- the same step); a name that creates the index (PEXPIRE NX succeeds: a key made
-- just now by ZADD) has nothing to sweep; only a name new to an index with other
-- entries sweeps those whose scores have passed.
local function index_holder(k, expiry, now)
    local ms = ttl_ms(expiry, now)
    if redis.call('ZADD', k.index, 'GT', fmt(expiry), k.name) == 0 then
        redis.call('PEXPIRE', k.index, ms, 'GT')
    elseif redis.call('PEXPIRE', k.index, ms, 'NX') == 0 then
        redis.call('ZREMRANGEBYSCORE', k.index, '-inf', fmt(now))
        redis.call('PEXPIRE', k.index, ms, 'GT')
    end
end

-- index_holder, skipped while the state's mark says the index covers `expiry`
-- already. When it does not, the name is indexed for twice the time left, so the
-- grants and hand-overs that follow (each a little later than the last) run no
-- index command until half of that has passed; an entry of a name whose holders
-- vanished without a release stays in the index at most that much longer. The
-- mark is only trusted because the index never loses the name while the state
-- lists holders: the entry's score and the key's TTL only grow (GT), sweeps drop
-- scores already passed, and the one script that unlists the name (break) does so
-- when no holder is left, which deletes the state, mark and all (release leaves
-- it listed: see release.lua). Every caller saves the state afterwards.
local function cover_index(s, k, expiry, now)
    if not s[3] then
        -- No mark: the state is new (its last holder released, deleting state and
        -- mark, or it never existed). A name taken again soon after its release is
        -- still listed (release leaves it: see release.lua), often for long enough:
        -- one ZSCORE then saves the ZADD and PEXPIRE. The listed score is a mark
        -- like any other: it only grew (GT), the key's TTL was raised to cover it
        -- when it was set, and a sweep or break never drops a score not yet passed
        -- while the name has holders.
        local listed = redis.call('ZSCORE', k.index, k.name)
        if listed then
            s[3] = tonumber(listed)
        end
    end
    if s[3] and expiry <= s[3] then
        return
    end
    local cover = expiry + (expiry - now)
    index_holder(k, cover, now)
    s[3] = cover
end

-- Write the holders back with a TTL that covers every expiry in them (so a name
-- whose holders all vanished disappears by itself), or delete them when none is left.
local function save(s, k, now)
    local latest = 0
    for _, h in ipairs(s[2]) do
        latest = math.max(latest, h[H_EXPIRY])
    end
    if latest <= now then
        redis.call('DEL', k.state)
    else
        redis.call('SET', k.state, cmsgpack.pack(s), 'PX', ttl_ms(latest, now))
    end
end
