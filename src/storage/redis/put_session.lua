-- ARGV: id, uid, openid, unionid, created_at, last_seen, expires_at, ttl_ms (to the idle
-- deadline), life_ms (to the absolute one), max_per_user, 'new' to keep an existing session.
-- Ends the user's oldest sessions beyond the cap first. The user's index lives as long as its
-- longest-lived session (its TTL only ever grows). Returns 1 if written.
local p, id, uid, openid, unionid = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local max = tonumber(ARGV[11])
local skey = p .. 'session:' .. id
if ARGV[12] == 'new' and redis.call('EXISTS', skey) == 1 then return 0 end
local zkey = p .. 'sessions:' .. uid
redis.call('ZREM', zkey, id)
if redis.call('ZCARD', zkey) >= max then
  for _, other in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
    if redis.call('EXISTS', p .. 'session:' .. other) == 0 then redis.call('ZREM', zkey, other) end
  end
  while redis.call('ZCARD', zkey) >= max do
    local oldest = redis.call('ZPOPMIN', zkey)
    redis.call('DEL', p .. 'session:' .. oldest[1])
  end
end
redis.call('DEL', skey)
redis.call('HSET', skey, 'uid', uid, 'openid', openid, 'created_at', ARGV[6],
  'last_seen', ARGV[7], 'expires_at', ARGV[8])
redis.call('PEXPIRE', skey, ARGV[9])
redis.call('ZADD', zkey, ARGV[6], id)
if redis.call('PTTL', zkey) < tonumber(ARGV[10]) then redis.call('PEXPIRE', zkey, ARGV[10]) end
if unionid ~= '' then redis.call('HSET', skey, 'unionid', unionid) end
if ARGV[13] ~= '' then redis.call('HSET', skey, 'appid', ARGV[13]) end
return 1
