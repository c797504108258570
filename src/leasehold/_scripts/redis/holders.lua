-- holders.lua: the live holders of one name (AsyncStore.holders). Read only.
--
-- KEYS[1]  holders zset (token -> expiry_us)
-- KEYS[2]  state hash ('m:'..token -> meta)
-- ARGV     none
--
-- Returns  {now_us, expiry_us_1, meta_1, expiry_us_2, meta_2, ...}; meta is
--          "<fence> <acquired_us> <limit> <run_id> <holder json>". Tokens are
--          secret and never leave Redis.

local now = now_us()
local out = {now}
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. fmt(now), '+inf', 'WITHSCORES')
for i = 1, #live, 2 do
    local meta = redis.call('HGET', KEYS[2], 'm:' .. live[i])
    if meta then
        out[#out + 1] = tonumber(live[i + 1])
        out[#out + 1] = meta
    end
end
return out
