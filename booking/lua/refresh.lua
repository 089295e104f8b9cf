-- Extend a live hold: new expiry on the hold key and on its members in every day set.
-- KEYS[1] hold key, KEYS[2 .. 1+D] busy day sets
-- ARGV[1] token, ARGV[2] owner that must own the hold ('' = any), ARGV[3] ttl ms, ARGV[4] D,
-- ARGV[5 .. 4+D] epoch day numbers.
-- Replies: {'gone'} | {'keys', day number...} (retry with those days declared) | {'ok', expires ms, spans}
local hold = read_hold(KEYS[1])
if not hold or (ARGV[2] ~= '' and ARGV[2] ~= hold.owner) then
  return {'gone'}
end
local days = keys_by_day(2, 5, tonumber(ARGV[4]))
local missing = undeclared_days(hold, days)
if #missing > 0 then
  table.insert(missing, 1, 'keys')
  return missing
end
local ttl = tonumber(ARGV[3])
write_hold_members('ZREM', ARGV[1], hold, days)
hold.expires = fmt(now_ms() + ttl)
write_hold_members('ZADD', ARGV[1], hold, days)
redis.call('HSET', KEYS[1], 'x', hold.expires)
redis.call('PEXPIRE', KEYS[1], ttl)
return {'ok', hold.expires, redis.call('HGET', KEYS[1], 'b')}
