-- renew.lua: extend a batch of holders in one round trip (AsyncStore.renew).
--
-- KEYS     per item i (1-based), three keys:
--          [3i-2] holders zset, [3i-1] state hash, [3i] name index of the bucket
-- ARGV     per item i: [3i-2] name, [3i-1] token, [3i] ttl in microseconds
--
-- Returns  an array of 1 (renewed) / 0 (not a live holder), in item order.
--
-- A holder granted by an earlier server process (restart, failover to a replica)
-- is not renewed: a renewal it made may have been lost with that process, so the
-- stored expiry may be earlier than the holder believes. It answers 0, the holder
-- learns that its lease is lost, and the entry expires on its own.

local now = now_us()
local run_id = nil
local answers = {}
for i = 1, #KEYS / 3 do
    local holders, state, index = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
    local name, token = ARGV[3 * i - 2], ARGV[3 * i - 1]
    local ttl = tonumber(ARGV[3 * i])
    local ok = 0
    local expiry = redis.call('ZSCORE', holders, token)
    if expiry and tonumber(expiry) > now then
        local meta = redis.call('HGET', state, 'm:' .. token)
        if meta then
            local _, _, _, granted_by = parse_meta(meta)
            run_id = run_id or server_run_id()
            if granted_by == run_id then
                local until_us = now + ttl
                local ms = ttl_ms(until_us, now)
                redis.call('ZADD', holders, 'XX', fmt(until_us), token)
                keep_alive(holders, ms)
                keep_alive(state, ms)
                redis.call('ZADD', index, 'GT', fmt(until_us), name)
                keep_alive(index, ms)
                ok = 1
            end
        end
    end
    answers[i] = ok
end
return answers
