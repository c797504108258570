-- release.lua: remove a token as holder and as waiter of a name (AsyncStore.release).
--
-- KEYS[1..3]  as acquire.lua: state, fence floor (for the fences of hand-overs),
--             name index
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

local k = name_keys()
local token = ARGV[3]
local now = now_us()
local s = load(k.state)
purge(s, k, now)
local held = 0
local mine = find(s[2], token)
if mine then
    local h = table.remove(s[2], mine)
    held = 1
    if h[8] == 1 then
        -- A hand-over its waiter never collected leaves its grant signal behind.
        redis.call('DEL', k.signal_prefix .. token)
    end
end
local queued = find(s[3], token)
if queued then
    table.remove(s[3], queued)
    redis.call('DEL', k.signal_prefix .. token)
end
if held == 0 and not queued and #s[3] == 0 then
    -- Nothing of ours here and nobody to hand a place to: change nothing, except
    -- cleaning up after a name whose holders all expired.
    if #s[2] == 0 then
        redis.call('ZREM', k.index, k.name)
        redis.call('DEL', k.state)
    end
    return 0
end
local index_until = hand_over(s, k, now, ARGV[4] or '', nil)
if index_until then
    index_holder(k, index_until, now)
elseif #s[2] == 0 then
    redis.call('ZREM', k.index, k.name) -- nothing held: unlisted at once
end
save(s, k, now)
return held
