-- leases.lua: every live holder of every name starting with a prefix
-- (AsyncStore.leases). Read only; one atomic snapshot.
--
-- KEYS     the name index of every bucket: "<key prefix>{<bucket>}:index"
-- ARGV[1]  name prefix ('' for all names)
--
-- Returns  {now_us, name_1, expiry_us_1, meta_1, name_2, ...}, one triple per
--          live holder; meta as in holders.lua.
--
-- A bucket's name state is "<key prefix>{<bucket>}:n:<name>"; the bucket part is
-- the index key without ":index". Standalone Redis only: in a cluster the buckets
-- live in different slots, so this would run once per node with that node's
-- buckets (see the docs).

local now = now_us()
local prefix = ARGV[1]
local out = {now}
local since = '(' .. fmt(now)
for _, index in ipairs(KEYS) do
    local names = redis.call('ZRANGEBYSCORE', index, since, '+inf')
    if #names > 0 then
        local bucket = string.sub(index, 1, #index - #':index')
        for _, name in ipairs(names) do
            if string.sub(name, 1, #prefix) == prefix then
                local raw = redis.call('GET', bucket .. ':n:' .. name)
                if raw then
                    for _, h in ipairs(cmsgpack.unpack(raw)[2]) do
                        if h[2] > now then
                            out[#out + 1] = name
                            out[#out + 1] = h[2]
                            out[#out + 1] = meta_of(h)
                        end
                    end
                end
            end
        end
    end
end
return out
