-- break.lua: forcibly remove every holder of a name (AsyncStore.break_lease).
--
-- KEYS[1..6]  as acquire.lua: holders, state, queue, queue expiry, fence floor
--             (unused: the next grant's fence exceeds the broken ones anyway, as
--             fences only grow), name index
-- ARGV[1]     name
-- ARGV[2]     signal prefix (a waiter's signal list is ARGV[2] .. token)
--
-- Returns     the number of live holders removed. Waiters that can now be granted
--             are signalled.

local k = name_keys()
local now = now_us()
purge(k, now)
local tokens = redis.call('ZRANGE', k.holders, 0, -1)
for _, token in ipairs(tokens) do
    redis.call('HDEL', k.state, 'm:' .. token)
end
redis.call('DEL', k.holders)
wake(k, now)
settle(k, now)
return #tokens
