-- fenced_write.lua: apply a batch of simple writes only if the caller's fence is
-- not lower than the highest fence seen for the name; record the new highest.
--
-- KEYS[1]    the fence key: highest fence seen for the name, a decimal string.
--            It never expires: a stale holder can come back at any time.
-- KEYS[2..]  the data keys, in the order the commands below consume them.
-- ARGV[1]    the caller's fence: a decimal integer without leading zeros.
-- ARGV[2]    N, the number of commands.
-- ARGV[3..]  per command: its name, k = how many keys it takes (the next k of
--            KEYS[2..]), a = how many arguments, then the a arguments.
--
-- Returns    {1, {reply_1, ..., reply_N}}  fence accepted, commands applied
--            {0, highest}                  stale: nothing was written
--
-- The whole script runs atomically. The fence is checked before any write, so a
-- stale holder never writes anything. Redis has no rollback: if command i fails
-- (say WRONGTYPE), commands 1..i-1 stay applied and the error is returned.

-- Mirrors the Python allow-list (leasehold.fence._redis), checked again here so that
-- nothing but plain single-purpose writes can run under the fence.
local allowed = {
    SET = true, SETNX = true, SETEX = true, PSETEX = true, GETSET = true,
    GETDEL = true, APPEND = true, SETRANGE = true,
    INCR = true, INCRBY = true, INCRBYFLOAT = true, DECR = true, DECRBY = true,
    HSET = true, HSETNX = true, HDEL = true, HINCRBY = true, HINCRBYFLOAT = true,
    LPUSH = true, RPUSH = true, LPOP = true, RPOP = true, LREM = true, LSET = true,
    LTRIM = true,
    SADD = true, SREM = true,
    ZADD = true, ZREM = true, ZINCRBY = true,
    XADD = true,
    EXPIRE = true, PEXPIRE = true, EXPIREAT = true, PEXPIREAT = true, PERSIST = true,
    DEL = true, UNLINK = true,
}

local function is_fence(s)
    return s == "0" or string.match(s, "^[1-9]%d*$") ~= nil
end

-- Fences can exceed 2^53, where Lua numbers (doubles) lose precision, so compare
-- the canonical decimal strings: a shorter one is smaller, equal lengths compare
-- digit by digit.
local function lower(a, b)
    if #a ~= #b then
        return #a < #b
    end
    return a < b
end

local fence = ARGV[1]
if not is_fence(fence) then
    return redis.error_reply("ERR leasehold fenced_write: bad fence " .. tostring(fence))
end

local highest = redis.call("GET", KEYS[1])
if highest then
    if not is_fence(highest) then
        return redis.error_reply("ERR leasehold fenced_write: " .. KEYS[1] .. " does not hold a fence")
    end
    if lower(fence, highest) then
        return {0, highest}
    end
end

-- Parse every command before running the first, so that a malformed batch writes
-- nothing at all.
local commands = {}
local n = tonumber(ARGV[2])
local next_key, next_arg = 2, 3
for i = 1, n do
    local name = string.upper(ARGV[next_arg])
    local nkeys, nargs = tonumber(ARGV[next_arg + 1]), tonumber(ARGV[next_arg + 2])
    next_arg = next_arg + 3
    if not allowed[name] then
        return redis.error_reply("ERR leasehold fenced_write: command not allowed: " .. name)
    end
    local call = {name}
    for _ = 1, nkeys do
        if KEYS[next_key] == KEYS[1] then
            return redis.error_reply("ERR leasehold fenced_write: commands may not touch the fence key")
        end
        call[#call + 1] = KEYS[next_key]
        next_key = next_key + 1
    end
    for _ = 1, nargs do
        call[#call + 1] = ARGV[next_arg]
        next_arg = next_arg + 1
    end
    commands[i] = call
end
if next_key ~= #KEYS + 1 or next_arg ~= #ARGV + 1 then
    return redis.error_reply("ERR leasehold fenced_write: KEYS/ARGV do not match the commands")
end

if highest ~= fence then
    redis.call("SET", KEYS[1], fence)
end

local replies = {}
for i = 1, n do
    replies[i] = redis.call(unpack(commands[i]))
end
return {1, replies}
