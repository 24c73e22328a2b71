-- ARGV: uid, openid, unionid, session_key, created_at, updated_at, profile, phone ('' for none).
-- A user already in Redis is kept as it is (it may have logged in there since): returns 0.
local p, uid, openid, unionid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local owner = redis.call('GET', p .. 'uid:' .. uid)
if owner and owner ~= openid then
  return redis.error_reply('uid ' .. uid .. ' already belongs to another openid')
end
local ukey = p .. 'user:' .. openid
if redis.call('EXISTS', ukey) == 1 then return 0 end
redis.call('INCR', p .. 'user_count')
redis.call('HSET', ukey, 'uid', uid, 'openid', openid, 'session_key', ARGV[5],
  'created_at', ARGV[6], 'updated_at', ARGV[7])
bind_unionid(p, ukey, uid, unionid)
if ARGV[8] ~= '' then redis.call('HSET', ukey, 'profile', ARGV[8]) end
if ARGV[9] ~= '' then redis.call('HSET', ukey, 'phone', ARGV[9]) end
redis.call('SET', p .. 'uid:' .. uid, openid)
local last = tonumber(redis.call('GET', p .. 'next_uid') or '0')
if tonumber(uid) > last then redis.call('SET', p .. 'next_uid', uid) end
return 1
