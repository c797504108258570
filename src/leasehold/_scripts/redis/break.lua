-- break.lua: forcibly remove every holder of a name (AsyncStore.break_lease).
--
-- KEYS[1..6]  as acquire.lua: holders, state, queue, queue expiry, fence floor
--             (unused: the next grant's fence exceeds the broken ones anyway, as
--             fences only grow), name index
-- ARGV[1]     name
-- ARGV[2]     signal prefix (a waiter's signal list is ARGV[2] .. token)
--
-- Returns     the number of live holders removed (not counting places handed over
--             but not yet confirmed, as in release.lua). Waiters that can now be
--             granted are signalled.

local k = name_keys()
local now = now_us()
purge_holders(k, now)
local waiting = purge_queue(k, now)
local removed = 0
for _, token in ipairs(redis.call('ZRANGE', k.holders, 0, -1)) do
    local meta = redis.call('HGET', k.state, 'm:' .. token)
    if meta then
        local _, _, _, granted_by = parse_meta(meta)
        if granted_by ~= '' then
            removed = removed + 1
        end
        redis.call('HDEL', k.state, 'm:' .. token)
    end
    -- An unconfirmed hand-over's grant signal (absent for other holders).
    redis.call('DEL', k.signal_prefix .. token)
end
redis.call('DEL', k.holders)
if waiting > 0 then
    wake(k, now, tonumber(redis.call('HGET', k.state, 'limit') or '1'))
end
settle(k, now, waiting)
return removed
