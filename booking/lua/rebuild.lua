-- Replace the booking entries of some days with the ledger's, keep live holds, mark the days built.
-- KEYS[1] meta hash, KEYS[2 .. 1+D] busy day sets
-- ARGV[1] D, ARGV[2 .. 1+D] day names (YYYY-MM-DD), then (day position 1..D, score, member) triples.
local ndays = tonumber(ARGV[1])
local now = now_ms()
for i = 1, ndays do
  local stale = {}
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1 + i], 0, -1)) do
    local kind = string.sub(member, 1, 1)
    if kind == 'b' or (kind == 'h' and tonumber(split(member)[5]) <= now) then
      stale[#stale + 1] = member
    end
  end
  call_chunked('ZREM', KEYS[1 + i], stale)
end
for a = 2 + ndays, #ARGV, 3 do
  redis.call('ZADD', KEYS[1 + tonumber(ARGV[a])], ARGV[a + 1], ARGV[a + 2])
end
local first, last = ARGV[2], ARGV[1 + ndays]
local old = redis.call('HMGET', KEYS[1], 'first_day', 'last_day')
if old[1] and old[1] < first then
  first = old[1]
end
if old[2] and old[2] > last then
  last = old[2]
end
local marks = {'built_at', fmt(now), 'first_day', first, 'last_day', last}
for i = 1, ndays do
  marks[#marks + 1] = 'day:' .. ARGV[1 + i]
  marks[#marks + 1] = fmt(now)
end
call_chunked('HSET', KEYS[1], marks)
return {'ok'}
