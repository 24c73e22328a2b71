-- ARGV: uid, openid, unionid, session_key, created_at, updated_at, profile, phone ('' for none),
-- identity key, appid ('' for the default app). A user already in Redis is kept as it is (it may
-- have logged in there since): returns 0. An identity of another app than the uid's first joins
-- the uid; one of the same app is an error.
local p, uid, openid, unionid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ikey, appid = ARGV[10], ARGV[11]
local owner = redis.call('GET', p .. 'uid:' .. uid)
local joins = false
if owner and owner ~= ikey then
  local owner_app = redis.call('HGET', p .. 'user:' .. owner, 'appid') or ''
  if owner_app == appid then
    return redis.error_reply('uid ' .. uid .. ' already belongs to another openid')
  end
  joins = true
end
local ukey = p .. 'user:' .. ikey
if redis.call('EXISTS', ukey) == 1 then return 0 end
if not joins then redis.call('INCR', p .. 'user_count') end
redis.call('HSET', ukey, 'uid', uid, 'openid', openid, 'session_key', ARGV[5],
  'created_at', ARGV[6], 'updated_at', ARGV[7])
if appid ~= '' then redis.call('HSET', ukey, 'appid', appid) end
bind_unionid(p, ukey, uid, unionid)
if ARGV[8] ~= '' then redis.call('HSET', ukey, 'profile', ARGV[8]) end
if ARGV[9] ~= '' then redis.call('HSET', ukey, 'phone', ARGV[9]) end
if joins and appid == '' then
  -- The default app's identity is a uid's first, whatever order the lines come in.
  redis.call('SADD', p .. 'identities:' .. uid, owner)
  redis.call('SET', p .. 'uid:' .. uid, ikey)
elseif joins then
  redis.call('SADD', p .. 'identities:' .. uid, ikey)
else
  redis.call('SET', p .. 'uid:' .. uid, ikey)
end
local last = tonumber(redis.call('GET', p .. 'next_uid') or '0')
if tonumber(uid) > last then redis.call('SET', p .. 'next_uid', uid) end
return 1
