-- Drop a hold (when a token is given and still live) and apply booking entry changes, atomically.
-- Used by confirm, release, add/remove/move booking.
-- KEYS[1] hold key (any key of the resource when there is no token), KEYS[2 .. 1+D] busy day sets
-- ARGV[1] token ('' = none), ARGV[2] D, ARGV[3 .. 2+D] epoch day numbers,
-- then R, R x (day position 1..D, score, member) to remove, then A, A x (day position, score, member) to add.
-- Replies: {'ok', 1 if the hold was live else 0} | {'keys', day number...} when the hold touches days
-- whose keys were not declared (the caller retries with them; nothing was written).
local token, ndays = ARGV[1], tonumber(ARGV[2])
local days = keys_by_day(2, 3, ndays)
local live = 0
if token ~= '' then
  local hold = read_hold(KEYS[1])
  if hold then
    local missing = undeclared_days(hold, days)
    if #missing > 0 then
      table.insert(missing, 1, 'keys')
      return missing
    end
    write_hold_members('ZREM', token, hold, days)
    redis.call('DEL', KEYS[1])
    live = 1
  end
end
local a = 3 + ndays
local removals = tonumber(ARGV[a])
a = a + 1
for _ = 1, removals do
  redis.call('ZREM', KEYS[1 + tonumber(ARGV[a])], ARGV[a + 2])
  a = a + 3
end
local additions = tonumber(ARGV[a])
a = a + 1
for _ = 1, additions do
  redis.call('ZADD', KEYS[1 + tonumber(ARGV[a])], ARGV[a + 1], ARGV[a + 2])
  a = a + 3
end
return {'ok', live}
