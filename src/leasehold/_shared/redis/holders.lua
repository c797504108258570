-- holders.lua: the live holders of one name (AsyncStore.holders). Read only.
--
-- KEYS[1]  the name's state (see the prelude)
-- ARGV     none
--
-- Returns  {now_us, expiry_us_1, meta_1, expiry_us_2, meta_2, ...} in grant order;
--          meta is "<fence> <acquired_us> <limit> <run_id> <holder json>". Tokens
--          are secret and never leave Redis.

local now = now_us()
local out = {now}
local raw = redis.call('GET', KEYS[1])
if raw then
    for _, h in ipairs(cmsgpack.unpack(raw)[2]) do
        if h[2] > now then
            out[#out + 1] = h[2]
            out[#out + 1] = meta_of(h)
        end
    end
end
return out
