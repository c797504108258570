-- record_write.lua: compare-and-set one versioned record (AsyncStore.write_record).
--
-- KEYS[1]  the record: hash 'v' -> version, 'd' -> value bytes; TTL = expiry
-- KEYS[2]  fence floor of the record's bucket (shared with lease fences)
-- ARGV[1]  expected version (0: the record must be absent)
-- ARGV[2]  '1' to delete the record, '0' to store ARGV[3]
-- ARGV[3]  the value (ignored when deleting)
-- ARGV[4]  ttl in milliseconds, or '' for no expiry
--
-- Returns  the new version, or -1 (nothing changed) when the current version
--          differs from ARGV[1].
--
-- Versions are drawn like fences, max(floor + 1, now_us), so a version is never
-- reused for a key: not after a deletion or expiry (the floor remembers), and not
-- after Redis lost its data (the clock has moved on).

local now = now_us()
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if current ~= tonumber(ARGV[1]) then
    return -1
end
local floor = tonumber(redis.call('GET', KEYS[2]) or '0')
local version = math.max(floor + 1, now)
redis.call('SET', KEYS[2], fmt(version))
redis.call('DEL', KEYS[1])
if ARGV[2] == '0' then
    redis.call('HSET', KEYS[1], 'v', fmt(version), 'd', ARGV[3])
    if ARGV[4] ~= '' then
        redis.call('PEXPIRE', KEYS[1], ARGV[4])
    end
end
return version
