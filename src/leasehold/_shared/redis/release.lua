-- release.lua: remove a token as holder and as waiter of a name (AsyncStore.release).
--
-- KEYS[1..6]  as acquire.lua: holders, fence floor (for the fences of hand-overs),
--             name index, queue, queue expiry, queue info
-- ARGV[1]     name
-- ARGV[2]     signal prefix (a waiter's signal list is ARGV[2] .. token)
-- ARGV[3]     token
-- ARGV[4]     run id of the server as the client read it (stamped on hand-overs)
--
-- Returns     1 if the token was a live holder (a handed-over one too), else 0.
--             Idempotent.
--
-- Then hands the free places to the first waiters in the same step (one, for a
-- lock; see hand_over in the prelude): the waiter holds without another call.

local k = name_keys(KEYS, ARGV)
local token = ARGV[3]
local now = now_us()
local s = load(k.state)
local dirty = purge(s, k, now)
local waiting = any_waiting(k, now)
local held = 0
local mine = find(s[2], token)
if mine then
    local h = table.remove(s[2], mine)
    held = 1
    dirty = true
    if h[8] == 1 then
        -- A hand-over its waiter never collected leaves its grant signal behind.
        redis.call('DEL', k.signal_prefix .. token)
    end
end
-- A holder is never queued (every grant unqueues its token), so only a token that
-- holds nothing may be a waiter giving up.
if waiting > 0 and not mine and redis.call('ZREM', k.queue, token) == 1 then
    redis.call('ZREM', k.queue_expiry, token)
    redis.call('HDEL', k.queue_info, token)
    waiting = waiting - 1
end
local index_until = nil
if waiting > 0 then
    local left
    index_until, left = hand_over(s, k, now, ARGV[4] or '', nil, waiting)
    dirty = dirty or left ~= waiting
    waiting = left
end
-- A name nobody holds any more stays listed in the index until its score passes:
-- leases() skips a listed name without holders, and the name's next grant finds
-- itself listed (one ZADD, one PEXPIRE) instead of listing itself anew, which in an
-- index that lists other names costs a sweep too (four commands, and one here).
if index_until then
    cover_index(s, k, index_until, now)
end
if dirty then
    save(s, k, now)
end
return held
