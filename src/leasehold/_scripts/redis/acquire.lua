-- acquire.lua: try once to add a token as a holder of a name (AsyncStore.acquire).
--
-- KEYS[1]  holders      zset   token -> expiry_us
-- KEYS[2]  state        hash   'limit' -> last requested limit; 'm:'..token -> meta
-- KEYS[3]  queue        zset   token -> arrival (strictly increasing per name)
-- KEYS[4]  queue expiry zset   token -> queue expiry_us
-- KEYS[5]  fence floor  string highest fence issued in the name's bucket
-- KEYS[6]  name index   zset   name -> latest holder expiry_us, per bucket
-- ARGV[1]  name
-- ARGV[2]  signal prefix: the waiter's signal list is ARGV[2] .. token
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

local k = name_keys()
local token = ARGV[3]
local ttl = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local queue_ttl = ARGV[6] ~= '' and tonumber(ARGV[6]) or nil
local holder = ARGV[7]
local run_id = ARGV[8]
local meta_field = 'm:' .. token

local now = now_us()
local held = purge_holders(k, now)
local waiting = purge_queue(k, now)

if held > 0 and redis.call('ZSCORE', k.holders, token) then
    local meta = redis.call('HGET', k.state, meta_field)
    if meta then
        -- Already a holder: a retry of an acquire whose answer was lost, or a waiter
        -- confirming the place release.lua handed it. Refresh the expiry, keep the
        -- fence, and restamp the run id: the caller measures its deadline from this
        -- call, which this server has now answered.
        local fence, acquired, held_limit, _, held_by = parse_meta(meta)
        redis.call('ZADD', k.holders, fmt(now + ttl), token)
        redis.call('HSET', k.state, 'limit', fmt(limit), meta_field,
            make_meta(tonumber(fence), tonumber(acquired), tonumber(held_limit), run_id, held_by))
        redis.call('DEL', k.signal_prefix .. token)
        settle(k, now, waiting)
        return {1, tonumber(fence)}
    end
end

local free = limit - held
local position = nil
if waiting > 0 then
    position = redis.call('ZRANK', k.queue, token)
end
local ahead = position or waiting

if ahead < free then
    local fence = next_fence(k, now)
    redis.call('ZADD', k.holders, fmt(now + ttl), token)
    redis.call('HSET', k.state, 'limit', fmt(limit), meta_field,
        make_meta(fence, now, limit, run_id, holder))
    if position then
        redis.call('ZREM', k.queue, token)
        redis.call('ZREM', k.queue_expiry, token)
        redis.call('HDEL', k.state, 'w:' .. token)
        redis.call('DEL', k.signal_prefix .. token)
        waiting = waiting - 1
        -- Places may remain (a semaphore): the waiters now at the head can go next.
        wake(k, now, free - 1)
    end
    -- The only holder: its expiry is the latest (else settle looks it up).
    settle(k, now, waiting, held == 0 and now + ttl or nil)
    return {1, fence}
end

redis.call('HSET', k.state, 'limit', fmt(limit))
if queue_ttl then
    if not position then
        local arrival = now
        if waiting > 0 then
            local last = redis.call('ZRANGE', k.queue, -1, -1, 'WITHSCORES')
            if last[2] and tonumber(last[2]) >= arrival then
                arrival = tonumber(last[2]) + 1
            end
        end
        redis.call('ZADD', k.queue, fmt(arrival), token)
        -- What release.lua needs to hand this waiter a place.
        redis.call('HSET', k.state, 'w:' .. token, fmt(limit) .. ' ' .. holder)
        position = waiting
        waiting = waiting + 1
    end
    redis.call('ZADD', k.queue_expiry, fmt(now + queue_ttl), token)
end

-- Places are free but waiters ahead hold them up: make sure those waiters know
-- (normally they were handed the place already; this covers holders that expired
-- instead of releasing, and a signal lost in a failover).
if free > 0 and waiting > 0 then
    wake(k, now, free)
end
settle(k, now, waiting)

local retry_after = -1
local soonest = redis.call('ZRANGE', k.holders, 0, 0, 'WITHSCORES')
if soonest[2] then
    retry_after = tonumber(soonest[2]) - now
end
return {0, retry_after, position or -1}
