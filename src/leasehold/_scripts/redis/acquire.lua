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
--
-- Returns  {1, fence}                         granted (or already held: same fence)
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
local signal = k.signal_prefix .. token

local now = now_us()
purge(k, now)
redis.call('HSET', k.state, 'limit', fmt(limit))

local meta_field = 'm:' .. token
local meta = redis.call('HGET', k.state, meta_field)
if redis.call('ZSCORE', k.holders, token) and meta then
    -- Already a holder: this is a retry of an acquire whose answer was lost.
    -- Refresh the expiry, keep the fence, and restamp the run id: the caller
    -- measures its deadline from this call, which this server has now answered.
    local fence, acquired, held_limit, _, held_by = parse_meta(meta)
    redis.call('ZADD', k.holders, fmt(now + ttl), token)
    redis.call('HSET', k.state, meta_field,
        make_meta(tonumber(fence), tonumber(acquired), tonumber(held_limit), server_run_id(), held_by))
    redis.call('ZREM', k.queue, token)
    redis.call('ZREM', k.queue_expiry, token)
    redis.call('DEL', signal)
    settle(k, now)
    return {1, tonumber(fence)}
end

local free = limit - redis.call('ZCARD', k.holders)
local position = redis.call('ZRANK', k.queue, token)
local ahead = position or redis.call('ZCARD', k.queue)

if ahead < free then
    local floor = tonumber(redis.call('GET', k.floor) or '0')
    local fence = math.max(floor + 1, now)
    redis.call('SET', k.floor, fmt(fence))
    redis.call('ZADD', k.holders, fmt(now + ttl), token)
    redis.call('HSET', k.state, meta_field, make_meta(fence, now, limit, server_run_id(), holder))
    redis.call('ZREM', k.queue, token)
    redis.call('ZREM', k.queue_expiry, token)
    redis.call('DEL', signal)
    -- Places may remain (a semaphore): the waiters now at the head can go next.
    wake(k, now)
    settle(k, now)
    return {1, fence}
end

if queue_ttl then
    if not position then
        local arrival = now
        local last = redis.call('ZRANGE', k.queue, -1, -1, 'WITHSCORES')
        if last[2] and tonumber(last[2]) >= arrival then
            arrival = tonumber(last[2]) + 1
        end
        redis.call('ZADD', k.queue, fmt(arrival), token)
        position = redis.call('ZRANK', k.queue, token)
    end
    redis.call('ZADD', k.queue_expiry, fmt(now + queue_ttl), token)
end

-- Places are free but waiters ahead hold them up: make sure those waiters know
-- (normally they were signalled already; this repairs a signal lost in a failover).
wake(k, now)
settle(k, now)

local retry_after = -1
local soonest = redis.call('ZRANGE', k.holders, 0, 0, 'WITHSCORES')
if soonest[2] then
    retry_after = tonumber(soonest[2]) - now
end
return {0, retry_after, position or -1}
