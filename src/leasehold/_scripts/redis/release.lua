-- release.lua: remove a token as holder and as waiter of a name (AsyncStore.release).
--
-- KEYS[1..6]  as acquire.lua: holders, state, queue, queue expiry, fence floor
--             (unused, passed so every per-name script takes the same keys), name index
-- ARGV[1]     name
-- ARGV[2]     signal prefix (a waiter's signal list is ARGV[2] .. token)
-- ARGV[3]     token
--
-- Returns     1 if the token was a live holder, else 0. Idempotent.
--
-- Then signals the first waiters that can now be granted (one, for a lock).

local k = name_keys()
local token = ARGV[3]
local now = now_us()
purge(k, now)
local held = 0
if redis.call('ZREM', k.holders, token) == 1 then
    held = 1
end
redis.call('HDEL', k.state, 'm:' .. token)
redis.call('ZREM', k.queue, token)
redis.call('ZREM', k.queue_expiry, token)
redis.call('DEL', k.signal_prefix .. token)
wake(k, now)
settle(k, now)
return held
