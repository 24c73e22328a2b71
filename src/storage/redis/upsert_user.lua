-- ARGV: openid, session_key, unionid ('' for none), now. Returns {is_new, uid, unionid or ''}.
local p, openid, key, unionid, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ukey = p .. 'user:' .. openid
local uid = redis.call('HGET', ukey, 'uid')
local is_new = 0
if not uid then
  uid = redis.call('INCR', p .. 'next_uid')
  redis.call('INCR', p .. 'user_count')
  redis.call('HSET', ukey, 'uid', uid, 'openid', openid, 'created_at', now)
  redis.call('SET', p .. 'uid:' .. uid, openid)
  is_new = 1
end
redis.call('HSET', ukey, 'session_key', key, 'updated_at', now)
bind_unionid(p, ukey, uid, unionid)
return {is_new, tonumber(uid), redis.call('HGET', ukey, 'unionid') or ''}
