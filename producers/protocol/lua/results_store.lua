-- Idempotent result writes (worker.results.ResultWriter.write): the first result stored
-- for a job chunk wins, and only that write announces itself on the reply list. A chunk
-- whose job has a tombstone (deleted or purged while it ran) is neither stored nor announced.
-- KEYS[1]: reply list ('' for none), KEYS[2]: the ledger ('' for none). ARGV[1]: ttl in
-- ms, ARGV[2]: the finished task's id, then (key, value, notice, tombstone key) quadruples.
if KEYS[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
local stored = {}
for i = 3, #ARGV, 4 do
  if redis.call('EXISTS', ARGV[i + 3]) == 0 and redis.call('SET', ARGV[i], ARGV[i + 1], 'NX', 'PX', ARGV[1]) then
    stored[#stored + 1] = ARGV[i + 2]
  end
end
if KEYS[1] ~= '' and #stored > 0 then
  for j = 1, #stored, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(stored, j, math.min(j + 999, #stored)))
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return #stored
