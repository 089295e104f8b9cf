-- Replace one day of external busy time (e.g. Google Calendar free/busy) and stamp when it was fetched.
-- Both keys expire after the external TTL, so stale calendar data disappears by itself.
-- KEYS[1] external day set, KEYS[2] fetched-at stamp
-- ARGV[1] ttl ms, ARGV[2] fetched-at ms, then (score, member) pairs.
redis.call('DEL', KEYS[1])
for a = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[a], ARGV[a + 1])
end
if #ARGV > 2 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1])
return {'ok'}
