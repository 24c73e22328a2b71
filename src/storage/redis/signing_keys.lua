-- ARGV: kid, key (JSON; '' to add none). Adds the key if no key is stored yet (the first start
-- of the first broker). Returns {kid -> JSON, kid -> retired_at} as two flat lists.
local p = ARGV[1]
local keys, retired = p .. 'signing_keys', p .. 'signing_keys:retired'
if ARGV[3] ~= '' and redis.call('HLEN', keys) == 0 then redis.call('HSET', keys, ARGV[2], ARGV[3]) end
return {redis.call('HGETALL', keys), redis.call('HGETALL', retired)}
