-- waiters.lua: every live queued waiter of every name starting with a prefix
-- (AsyncStore.waiters). Read only; one atomic snapshot.
--
-- KEYS     the name index of every bucket: "<key prefix>{<bucket>}:index"
-- ARGV[1]  name prefix ('' for all names)
--
-- Returns  {now_us, name_1, queue_expiry_us_1, info_1, name_2, ...}, one triple per
--          live waiter, each name's waiters in queue order; info as stored by
--          acquire.lua: "<limit> <ttl_us> <holder json>".
--
-- The queue of a name is found through the bucket's name index, which lists names
-- with a holder: every index entry is looked at, expired ones too (the index is
-- swept lazily), so a queue is missed only once its name's last holder expired
-- and a later grant in the bucket swept the entry -- a queue whose head is then
-- granted at its next attempt. Cluster: one call per slot, as leases.lua.

local now = now_us()
local prefix = ARGV[1]
local out = {now}
for _, index in ipairs(KEYS) do
    local names = redis.call('ZRANGE', index, 0, -1)
    if #names > 0 then
        local bucket = string.sub(index, 1, #index - #':index')
        for _, name in ipairs(names) do
            if string.sub(name, 1, #prefix) == prefix then
                local queue = bucket .. ':qa:' .. name
                local expiries = bucket .. ':qe:' .. name
                local infos = bucket .. ':qi:' .. name
                for _, token in ipairs(redis.call('ZRANGE', queue, 0, -1)) do
                    local expiry = tonumber(redis.call('ZSCORE', expiries, token))
                    if expiry and expiry > now then
                        out[#out + 1] = name
                        out[#out + 1] = expiry
                        out[#out + 1] = redis.call('HGET', infos, token) or ''
                    end
                end
            end
        end
    end
end
return out
