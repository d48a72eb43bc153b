-- Renew a lock only for its owner (worker.ops.reconciler.LeaderLock).
-- KEYS[1]: the lock. ARGV[1]: the owner's token, ARGV[2]: the new TTL in ms.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
