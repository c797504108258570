-- release.lua: remove a token as holder and as waiter of a name (AsyncStore.release).
--
-- KEYS[1..6]  as acquire.lua: holders, state, queue, queue expiry, fence floor
--             (for the fences of hand-overs), name index
-- ARGV[1]     name
-- ARGV[2]     signal prefix (a waiter's signal list is ARGV[2] .. token)
-- ARGV[3]     token
--
-- Returns     1 if the token was a live holder, else 0 (also for a place handed
--             over to a waiter that never confirmed it). Idempotent.
--
-- Then hands the free places to the first waiters in the same step (one, for a
-- lock; see hand_over in the prelude): the woken waiter's acquire only confirms.

local k = name_keys()
local token = ARGV[3]
local now = now_us()
purge_holders(k, now)
local waiting = purge_queue(k, now)
local held = 0
local signalled = false
if redis.call('ZREM', k.holders, token) == 1 then
    local meta = redis.call('HGET', k.state, 'm:' .. token)
    if meta then
        local _, _, _, granted_by = parse_meta(meta)
        if granted_by ~= '' then
            held = 1
        else
            signalled = true -- an unconfirmed hand-over: its grant signal goes too
        end
        redis.call('HDEL', k.state, 'm:' .. token)
    end
end
if waiting > 0 and redis.call('ZREM', k.queue, token) == 1 then
    redis.call('ZREM', k.queue_expiry, token)
    redis.call('HDEL', k.state, 'w:' .. token)
    signalled = true
    waiting = waiting - 1
end
if signalled then
    redis.call('DEL', k.signal_prefix .. token)
end
if waiting > 0 then
    waiting = hand_over(k, now, waiting)
end
settle(k, now, waiting)
return held
