-- break.lua: forcibly remove every holder of a name (AsyncStore.break_lease).
--
-- KEYS[1..6]  as acquire.lua: holders, fence floor (for the fences of hand-overs;
--             the next grant's fence exceeds the broken ones anyway, as fences only
--             grow), name index, queue, queue expiry, queue info
-- ARGV[1]     name
-- ARGV[2]     signal prefix (a waiter's signal list is ARGV[2] .. token)
-- ARGV[3]     run id of the server as the client read it (stamped on hand-overs)
--
-- Returns     the number of live holders removed. The places go to the first
--             waiters, as on release.

local k = name_keys(KEYS, ARGV)
local now = now_us()
local s = load(k.state)
purge(s, k, now)
local waiting = purge_queue(k, now)
local removed = #s[2]
for _, h in ipairs(s[2]) do
    if h[8] == 1 then
        redis.call('DEL', k.signal_prefix .. h[1])
    end
end
s[2] = {}
local index_until = hand_over(s, k, now, ARGV[3] or '', nil, waiting)
if index_until then
    cover_index(s, k, index_until, now)
else
    redis.call('ZREM', k.index, k.name)
end
save(s, k, now)
return removed
