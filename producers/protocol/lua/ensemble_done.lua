-- One member of an ensemble stage finished a chunk (worker.ensemble.EnsembleRunner).
-- KEYS[1]: the chunk stage's completion set. ARGV: member item id, slots expected, ttl ms.
-- Returns 1 once every expected member is in the set.
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 1 end
return 0
