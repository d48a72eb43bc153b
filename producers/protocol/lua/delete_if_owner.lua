-- Delete a key only while it still holds the caller's value (a worker's liveness key:
-- another worker of the same queue may own it now).
-- KEYS[1]: the key. ARGV[1]: the value it must hold.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
