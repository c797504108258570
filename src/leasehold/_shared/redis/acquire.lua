-- acquire.lua: try once to add a token as a holder of a name (AsyncStore.acquire).
--
-- KEYS[1]  holders      string  the name's MessagePack holders (see the prelude)
-- KEYS[2]  fence floor  string  highest fence issued in the name's bucket
-- KEYS[3]  name index   zset    name -> latest holder expiry_us, per bucket
-- KEYS[4]  queue        zset    token -> arrival (strictly increasing per name)
-- KEYS[5]  queue expiry zset    token -> queue expiry_us
-- KEYS[6]  queue info   hash    token -> "<limit> <ttl_us> <holder json>"
-- ARGV[1]  name
-- ARGV[2]  signal prefix: a waiter's signal list is ARGV[2] .. token
-- ARGV[3]  token
-- ARGV[4]  ttl in microseconds
-- ARGV[5]  limit (holders allowed at once)
-- ARGV[6]  queue ttl in microseconds, or '' to not queue
-- ARGV[7]  holder json: [owner, host, pid]
-- ARGV[8]  run id of the server, as the client read it on connecting (INFO server);
--          stamped on the grant (renew.lua checks it against the real one)
--
-- Returns  {1, fence}                         granted (or already held: same fence,
--                                             which also confirms a hand-over)
--          {0, retry_after_us, position}      busy; -1 stands for "none"
--
-- Fences: fence = max(floor + 1, now_us), and the floor is set to it. The floor
-- makes fences strictly increasing while Redis keeps its data (even if the clock
-- steps back); the server clock keeps them increasing across data loss (restart
-- without persistence, FLUSHALL, an old RDB), provided the clock did not step back
-- across that loss. Floors are per bucket, so they stay bounded (one per bucket)
-- however many names are ever used.

local k = name_keys(KEYS, ARGV)
local token = ARGV[3]
local ttl = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local queue_ttl = ARGV[6] ~= '' and tonumber(ARGV[6]) or nil
local holder = ARGV[7]
local run_id = ARGV[8]

local now = now_us()
local s, existed = load(k.state)
local dirty = purge(s, k, now)
local waiting, dropped = purge_queue(k, now)
-- Places freed by holders that expired go to the waiters at the head first (the
-- caller too, if it is one of them). Every script that leaves holders and waiters
-- behind has handed over what it could (see the end of the grant below), so the
-- head can have a place now only if holders or waiters expired since, or the
-- holders are gone altogether (their key expired, or was lost): otherwise the
-- two commands that look at the head are saved.
local index_until, left = nil, waiting
if waiting > 0 and (dirty or dropped or not existed) then
    index_until, left = hand_over(s, k, now, run_id, token, waiting)
end
dirty = dirty or left ~= waiting
waiting = left
local holders = s[2]

local mine = find(holders, token)
if mine then
    -- Already a holder: a retry of an acquire whose answer was lost, a waiter whose
    -- hand-over signal went astray, or the caller handed a place just now. Refresh
    -- the expiry, keep the fence, restamp the run id: the caller measures its
    -- deadline from this call, which this server has now answered.
    local h = holders[mine]
    if h[8] == 1 then
        redis.call('DEL', k.signal_prefix .. token)
        h[8] = 0
    end
    h[2] = now + ttl
    h[6] = run_id
    s[1] = limit
    cover_index(s, k, math.max(h[2], index_until or 0), now)
    save(s, k, now)
    return {1, h[3]}
end

-- The caller's place in the queue matters only if a place is free: otherwise it
-- is looked up below, when queueing finds the caller queued already.
local position = nil
if waiting > 0 and #holders < limit then
    position = redis.call('ZRANK', k.queue, token)
end
local ahead = position or waiting
if ahead < limit - #holders then
    -- A place for the caller. When queued it may overtake waiters ahead whose own
    -- (smaller) limit leaves them no place: limits are per caller (docs/semaphores).
    if position then
        unqueue(k, token)
        waiting = waiting - 1
    end
    local fence = next_fence(k, now)
    holders[#holders + 1] = {token, now + ttl, fence, now, limit, run_id, holder, 0}
    s[1] = limit
    if position == 0 and waiting > 0 then
        -- The caller was the head: the next waiter may have a place too (with a
        -- larger limit of its own), and is handed it now.
        local granted
        granted, waiting = hand_over(s, k, now, run_id, token, waiting)
        index_until = math.max(index_until or 0, granted or 0)
    end
    cover_index(s, k, math.max(now + ttl, index_until or 0), now)
    save(s, k, now)
    return {1, fence}
end

if queue_ttl then
    local fresh = waiting == 0
    if not position then
        local arrival = now
        if waiting > 0 then
            local last = redis.call('ZRANGE', k.queue, -1, -1, 'WITHSCORES')
            if last[2] and tonumber(last[2]) >= arrival then
                arrival = tonumber(last[2]) + 1
            end
        end
        if redis.call('ZADD', k.queue, 'NX', fmt(arrival), token) == 1 then
            position = waiting
            waiting = waiting + 1
        else
            -- Queued already (a refresh): it keeps its place.
            position = redis.call('ZRANK', k.queue, token)
        end
    end
    redis.call('ZADD', k.queue_expiry, fmt(now + queue_ttl), token)
    redis.call('HSET', k.queue_info, token, fmt(limit) .. ' ' .. fmt(ttl) .. ' ' .. holder)
    cover_queue(k, now + queue_ttl, now, fresh, queue_ttl)
end
if index_until then
    cover_index(s, k, index_until, now)
end
if dirty then
    save(s, k, now)
end

local retry_after = -1
for _, h in ipairs(holders) do
    local remaining = h[2] - now
    if retry_after < 0 or remaining < retry_after then
        retry_after = remaining
    end
end
return {0, retry_after, position or -1}
