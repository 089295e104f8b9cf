-- Take one hold covering one or more blocks, all or nothing.
-- KEYS[1] meta hash, KEYS[2] hold key, KEYS[3 .. 2+D] busy day sets, KEYS[3+D .. 2+2D] external day sets,
-- KEYS[3+2D .. 2+3D] external fetched-at stamps
-- ARGV[1] token, ARGV[2] owner, ARGV[3] ttl ms, ARGV[4] booking id whose entries do not count ('' = none),
-- ARGV[5] '1' when external busy time refuses the hold (hard policy), '0' when it only warns (soft),
-- ARGV[6] D, ARGV[7 .. 6+D] epoch day numbers, ARGV[7+D .. 6+2D] day names (YYYY-MM-DD),
-- ARGV[7+2D ..] the blocks as start ms, end ms pairs.
-- Replies: {'not_ready', day name...} | {'unavailable', block index, start, end, ...}
--        | {'in_progress', token of the same owner's live hold}
--        | {'granted', expires ms, oldest fetched-at ms of the days' external data ('' when a day has
--           none), then start, end of each external interval the blocks overlap (soft policy only)}
local token, owner, ttl, ignore = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local refuse_external = ARGV[5] == '1'
local ndays = tonumber(ARGV[6])

-- Only days rebuilt from the ledger can answer; after a flush or restart the meta hash is gone.
local wanted = {}
for i = 1, ndays do
  wanted[i] = 'day:' .. ARGV[6 + ndays + i]
end
local built = redis.call('HMGET', KEYS[1], unpack(wanted))
local missing = {'not_ready'}
for i = 1, ndays do
  if not built[i] then
    missing[#missing + 1] = ARGV[6 + ndays + i]
  end
end
if #missing > 1 then
  return missing
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.error_reply('hold token already in use')
end

local busy = keys_by_day(3, 7, ndays)
local external = keys_by_day(3 + ndays, 7, ndays)
local now = now_ms()
local conflicts = {'unavailable'}
local overlaps, seen = {}, {}
local twin = nil
local first_block = 7 + 2 * ndays

local function conflict(index, s, e)
  conflicts[#conflicts + 1] = index
  conflicts[#conflicts + 1] = s
  conflicts[#conflicts + 1] = e
end

local index = 0
for a = first_block, #ARGV, 2 do
  index = index + 1
  local start, finish = tonumber(ARGV[a]), ARGV[a + 1]
  for d = day_of(start), day_of(tonumber(finish) - 1) do
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', busy[d], '-inf', '(' .. finish)) do
      local f = split(member)
      if f[1] == 'h' and tonumber(f[5]) <= now then
        redis.call('ZREM', busy[d], member)
      elseif tonumber(f[4]) > start then
        if f[1] == 'b' then
          if f[2] ~= ignore then
            conflict(index, f[3], f[4])
          end
        elseif f[6] == owner then
          twin = f[2]
        else
          conflict(index, f[3], f[4])
        end
      end
    end
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', external[d], '-inf', '(' .. finish)) do
      local f = split(member)
      if tonumber(f[3]) > start then
        if refuse_external then
          conflict(index, f[2], f[3])
        elseif not seen[member] then
          -- Soft policy: the time stays grantable; the overlap is reported once per interval.
          seen[member] = true
          overlaps[#overlaps + 1] = f[2]
          overlaps[#overlaps + 1] = f[3]
        end
      end
    end
  end
end

if #conflicts > 1 then
  return conflicts
end
if twin then
  return {'in_progress', twin}
end

-- How old the external data behind this answer is, so the caller can refresh it in the background.
local oldest = nil
for i = 1, ndays do
  local at = redis.call('GET', KEYS[2 + 2 * ndays + i])
  if not at then
    oldest = ''
    break
  end
  if oldest == nil or tonumber(at) < tonumber(oldest) then
    oldest = at
  end
end

local expires = fmt(now + ttl)
local blocks = {}
for a = first_block, #ARGV, 2 do
  blocks[#blocks + 1] = {ARGV[a], ARGV[a + 1]}
end
local hold = {owner = owner, expires = expires, blocks = blocks}
write_hold_members('ZADD', token, hold, busy)
local spans = {}
for i, block in ipairs(blocks) do
  spans[i] = block[1] .. ':' .. block[2]
end
redis.call('HSET', KEYS[2], 'o', owner, 'x', expires, 'b', table.concat(spans, ','))
redis.call('PEXPIRE', KEYS[2], ttl)
local reply = {'granted', expires, oldest or ''}
for _, value in ipairs(overlaps) do
  reply[#reply + 1] = value
end
return reply
