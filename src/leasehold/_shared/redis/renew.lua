-- renew.lua: extend a batch of holders in one round trip (AsyncStore.renew).
--
-- KEYS     per item i (1-based), two keys: [2i-1] the name's state, [2i] the name
--          index of its bucket
-- ARGV     per item i: [3i-2] name, [3i-1] token, [3i] ttl in microseconds
--
-- Returns  an array of 1 (renewed) / 0 (not a live holder) / 2 (a live holder
--          granted by an earlier server process), in item order.
--
-- A holder granted by an earlier server process (restart, failover to a replica)
-- is not renewed: a renewal it made may have been lost with that process, so the
-- stored expiry may be earlier than the holder believes. It answers 2 (not
-- renewed, and why), the holder learns that its lease is lost to the restart, and
-- the entry expires on its own.

local now = now_us()
local run_id = nil
local answers = {}
for i = 1, #KEYS / 2 do
    local state, index = KEYS[2 * i - 1], KEYS[2 * i]
    local name, token = ARGV[3 * i - 2], ARGV[3 * i - 1]
    local ttl = tonumber(ARGV[3 * i])
    local ok = 0
    local raw = redis.call('GET', state)
    if raw then
        local s = cmsgpack.unpack(raw)
        local mine = find(s[2], token)
        local h = mine and s[2][mine]
        if h and h[2] > now then
            run_id = run_id or server_run_id()
            if h[6] == run_id then
                local until_us = now + ttl
                h[2] = until_us
                local ms = ttl_ms(until_us, now)
                -- KEEPTTL then keep_alive: the key's TTL also covers other holders
                -- and waiters, so it may only grow here.
                redis.call('SET', state, cmsgpack.pack(s), 'KEEPTTL')
                keep_alive(state, ms)
                redis.call('ZADD', index, 'GT', fmt(until_us), name)
                keep_alive(index, ms)
                ok = 1
            else
                ok = 2
            end
        end
    end
    answers[i] = ok
end
return answers
