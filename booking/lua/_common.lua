-- Helpers shared by every free/busy script; booking/freebusy.py prepends this file to each one.
--
-- Members of a busy day set (score = start in epoch ms):
--   booking:  b|<booking id>|<start ms>|<end ms>
--   hold:     h|<token>|<start ms>|<end ms>|<expires ms>|<owner>
-- Members of an external day set:  x|<start ms>|<end ms>
-- Ids never contain '|' (the Python side refuses them), so splitting on '|' is exact.
-- Days are identified by their epoch day number (floor(ms / 86400000)) when a script must map a time
-- to one of the day keys it was given.

local DAY_MS = 86400000

-- Server time, so that hold expiry does not depend on the clocks of the application hosts.
-- Redis >= 5 replicates the effects of a script, which makes TIME legal before a write.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(n)
  return string.format('%.0f', n)
end

local function split(member)
  local out = {}
  for part in string.gmatch(member, '[^|]+') do
    out[#out + 1] = part
  end
  return out
end

local function day_of(ms)
  return math.floor(ms / DAY_MS)
end

-- Lua's unpack is limited by the C stack, so variadic commands go in chunks.
local function call_chunked(command, key, items)
  for i = 1, #items, 500 do
    redis.call(command, key, unpack(items, i, math.min(i + 499, #items)))
  end
end

-- Map epoch day number -> key, for `count` day keys starting at KEYS[first_key] whose day numbers are
-- ARGV[first_arg ..].
local function keys_by_day(first_key, first_arg, count)
  local map = {}
  for i = 0, count - 1 do
    map[tonumber(ARGV[first_arg + i])] = KEYS[first_key + i]
  end
  return map
end

-- A hold hash: o = owner, x = expires ms, b = "start:end,start:end,..." (its blocks, in ms).
local function read_hold(key)
  local h = redis.call('HMGET', key, 'o', 'x', 'b')
  if not h[1] then
    return nil
  end
  local blocks = {}
  for s, e in string.gmatch(h[3], '(%d+):(%d+)') do
    blocks[#blocks + 1] = {s, e}
  end
  return {owner = h[1], expires = h[2], blocks = blocks}
end

local function hold_member(token, block, expires, owner)
  return table.concat({'h', token, block[1], block[2], expires, owner}, '|')
end

-- Day numbers a hold's blocks touch that have no key in `days`; empty when the caller declared them all.
local function undeclared_days(hold, days)
  local missing, seen = {}, {}
  for _, block in ipairs(hold.blocks) do
    for d = day_of(tonumber(block[1])), day_of(tonumber(block[2]) - 1) do
      if not days[d] and not seen[d] then
        seen[d] = true
        missing[#missing + 1] = d
      end
    end
  end
  return missing
end

-- Add (command 'ZADD') or remove (command 'ZREM') the members of a hold on every day its blocks touch.
local function write_hold_members(command, token, hold, days)
  for _, block in ipairs(hold.blocks) do
    local member = hold_member(token, block, hold.expires, hold.owner)
    for d = day_of(tonumber(block[1])), day_of(tonumber(block[2]) - 1) do
      if command == 'ZADD' then
        redis.call('ZADD', days[d], block[1], member)
      else
        redis.call('ZREM', days[d], member)
      end
    end
  end
end
