-- Read everything that makes a resource busy inside a window, in one round trip. Writes nothing.
-- KEYS[1] meta hash, then per day i = 1..D: KEYS[1+i] busy set, KEYS[1+D+i] external set,
-- KEYS[1+2D+i] external fetched-at stamp.
-- ARGV[1] D, ARGV[2 .. 1+D] day names, ARGV[2+D] window start ms, ARGV[3+D] window end ms,
-- ARGV[4+D] '0' to leave external busy time out of the busy list (absent: included).
-- Reply: {1 if every day is built else 0, {start, end, ...}, {day position, fetched-at ms, ...}}
local ndays = tonumber(ARGV[1])
local wanted = {}
for i = 1, ndays do
  wanted[i] = 'day:' .. ARGV[1 + i]
end
local ready = 1
for _, mark in ipairs(redis.call('HMGET', KEYS[1], unpack(wanted))) do
  if not mark then
    ready = 0
  end
end
local now = now_ms()
local window_start, window_end = tonumber(ARGV[2 + ndays]), '(' .. ARGV[3 + ndays]
local with_external = ARGV[4 + ndays] ~= '0'
local busy, fetched = {}, {}
for i = 1, ndays do
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1 + i], '-inf', window_end)) do
    local f = split(member)
    if (f[1] ~= 'h' or tonumber(f[5]) > now) and tonumber(f[4]) > window_start then
      busy[#busy + 1] = f[3]
      busy[#busy + 1] = f[4]
    end
  end
  if with_external then
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1 + ndays + i], '-inf', window_end)) do
      local f = split(member)
      if tonumber(f[3]) > window_start then
        busy[#busy + 1] = f[2]
        busy[#busy + 1] = f[3]
      end
    end
  end
  local at = redis.call('GET', KEYS[1 + 2 * ndays + i])
  if at then
    fetched[#fetched + 1] = i
    fetched[#fetched + 1] = at
  end
end
return {ready, busy, fetched}
