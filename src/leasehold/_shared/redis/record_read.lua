-- record_read.lua: read one versioned record (AsyncStore.read_record). Read only.
--
-- KEYS[1]  the record: hash 'v' -> version, 'd' -> value bytes; its TTL (if any) is
--          the record's expiry, so an expired record is simply absent
-- ARGV     none
--
-- Returns  {now_us, version, value}: version 0 and value false when absent.

local now = now_us()
local found = redis.call('HMGET', KEYS[1], 'v', 'd')
if not found[1] then
    return {now, 0, false}
end
return {now, tonumber(found[1]), found[2]}
