-- The ledger's start of a task (producers.protocol.ledger.Ledger.begin): one round trip.
-- KEYS[1] task hash, KEYS[2] reliability counters hash, then (result key, attempts key,
-- tombstone key) per unit. ARGV: ttl_ms, claim (0/1), cap, worker, now, task_id, then one
-- chunk number per unit.
-- A unit with a tombstone (deleted or purged) counts as done: it never runs, and when no
-- unit is left to run the verdict is 'gone' (only the counter gone_deliveries is bumped).
local ttl, claim, cap = tonumber(ARGV[1]), ARGV[2] == '1', tonumber(ARGV[3])
local n = (#KEYS - 2) / 3
local done, pending, gone = {}, 0, 0
for i = 1, n do
  if redis.call('EXISTS', KEYS[2 + 3 * i]) == 1 then
    done[i] = 1
    gone = gone + 1
  else
    done[i] = redis.call('EXISTS', KEYS[3 * i])
  end
  if done[i] == 0 then pending = pending + 1 end
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if pending == 0 then
  if gone > 0 then
    redis.call('HINCRBY', KEYS[2], 'gone_deliveries', 1)
    return {'gone', attempts, unpack(done)}
  end
  redis.call('HINCRBY', KEYS[2], 'duplicate_deliveries', 1)
  return {'done', attempts, unpack(done)}
end
if attempts > 0 and not claim then return {'suspect', attempts, unpack(done)} end
if attempts >= cap then return {'dead', attempts, unpack(done)} end
attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('PEXPIRE', KEYS[1], ttl)
local dups = 0
for i = 1, n do
  if done[i] == 0 then
    local akey, chunk = KEYS[1 + 3 * i], ARGV[6 + i]
    local count = redis.call('HINCRBY', akey, chunk, 1)
    if count > 1 then dups = dups + 1 end
    local record = cjson.encode({worker = ARGV[4], started = ARGV[5], task = ARGV[6], attempt = count})
    redis.call('HSET', akey, chunk .. ':' .. count, record)
    redis.call('PEXPIRE', akey, ttl)
  end
end
redis.call('HINCRBY', KEYS[2], 'attempts', pending)
if dups > 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', dups) end
return {'run', attempts, unpack(done)}
