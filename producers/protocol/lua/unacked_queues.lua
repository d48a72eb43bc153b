-- Count kombu's delivered, unacknowledged messages per queue (their routing key).
-- KEYS[1]: kombu's unacked hash (delivery tag -> JSON [frame, exchange, routing key]).
-- Returns a flat array {queue, count, queue, count, ...}.
-- Only the last 256 bytes of each entry are matched: the routing key is the array's last
-- string, and a frame may be kilobytes long (an inline payload), so matching the whole
-- entry would cost Redis time in proportion to the payloads rather than to the messages.
local counts = {}
for _, entry in ipairs(redis.call('HVALS', KEYS[1])) do
  local queue = string.match(string.sub(entry, -256), '"([^"]*)"%s*%]%s*$')
  if queue then
    counts[queue] = (counts[queue] or 0) + 1
  end
end
local out = {}
for queue, n in pairs(counts) do
  out[#out + 1] = queue
  out[#out + 1] = n
end
return out
