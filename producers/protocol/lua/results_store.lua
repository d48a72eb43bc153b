-- Idempotent result writes (worker.results.ResultWriter.write): the first result stored
-- for a job chunk wins, and only that write announces itself on the reply list. A chunk
-- whose job has a tombstone (deleted or purged while it ran) is neither stored nor announced.
-- A result stored in parts (producers.protocol.parts) stores its parts with its manifest,
-- in this one call: the manifest is never there without them, and a redelivered chunk
-- that loses the race writes none of its own.
-- A big value arrives staged: SET under a staging key in the same round trip, and
-- RENAMEd here (O(1)): passed as an argument, Lua copies it twice (4-10x slower, measured).
-- KEYS[1]: reply list ('' for none), KEYS[2]: the ledger ('' for none). ARGV[1]: ttl in
-- ms, ARGV[2]: the finished task's id, then per outcome (key, staging key or '', value,
-- notice, tombstone key, part count n) followed by n (part key, staging key or '', value).
if KEYS[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
local ttl = ARGV[1]
local function put(key, stage, value)
  if stage == '' then
    redis.call('SET', key, value, 'PX', ttl)
  else
    redis.call('RENAME', stage, key)
    redis.call('PEXPIRE', key, ttl)
  end
end
local stored = {}
local i = 3
while i <= #ARGV do
  local parts = tonumber(ARGV[i + 5])
  local last = i + 5 + 3 * parts
  -- Every staged value must be there before anything is written (RENAME of a missing key
  -- fails mid-script); a write whose staging expired is not stored: the task runs again.
  local stages = {ARGV[i + 1]}
  for p = i + 6, last, 3 do stages[#stages + 1] = ARGV[p + 1] end
  local ready = redis.call('EXISTS', ARGV[i + 4]) == 0 and redis.call('EXISTS', ARGV[i]) == 0
  for _, stage in ipairs(stages) do
    if ready and stage ~= '' and redis.call('EXISTS', stage) == 0 then ready = false end
  end
  if ready then
    put(ARGV[i], ARGV[i + 1], ARGV[i + 2])
    stored[#stored + 1] = ARGV[i + 3]
    for p = i + 6, last, 3 do
      put(ARGV[p], ARGV[p + 1], ARGV[p + 2])
    end
  else
    for _, stage in ipairs(stages) do
      if stage ~= '' then redis.call('DEL', stage) end
    end
  end
  i = last + 1
end
if KEYS[1] ~= '' and #stored > 0 then
  for j = 1, #stored, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(stored, j, math.min(j + 999, #stored)))
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return #stored
