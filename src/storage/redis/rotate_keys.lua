-- ARGV: kid, key (JSON), now, keep. Retires every stored key at `now`, drops those retired
-- `keep` seconds ago or more, adds the new one (which signs from now on). Returns as
-- signing_keys.lua does.
local p, kid, json, now, keep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local keys, retired = p .. 'signing_keys', p .. 'signing_keys:retired'
for _, old in ipairs(redis.call('HKEYS', keys)) do
  local at = redis.call('HGET', retired, old)
  if not at then
    redis.call('HSET', retired, old, now)
  elseif tonumber(at) + keep <= now then
    redis.call('HDEL', keys, old)
    redis.call('HDEL', retired, old)
  end
end
redis.call('HSET', keys, kid, json)
return {redis.call('HGETALL', keys), redis.call('HGETALL', retired)}
