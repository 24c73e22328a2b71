-- ARGV: identity key, openid, session_key, unionid ('' for none), now, appid ('' for the default
-- app). Returns {is_new, uid, unionid or ''}. A new identity whose unionid belongs to a uid joins
-- it (not new): one uid per person, however many brokers register them at once.
local p, ikey, openid, key, unionid, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local appid = ARGV[7]
local ukey = p .. 'user:' .. ikey
local uid = redis.call('HGET', ukey, 'uid')
local is_new = 0
if not uid then
  local held = false
  if unionid ~= '' then held = redis.call('GET', p .. 'unionid:' .. unionid) end
  if held and redis.call('EXISTS', p .. 'uid:' .. held) == 1 then
    uid = held
    redis.call('SADD', p .. 'identities:' .. uid, ikey)
  else
    uid = redis.call('INCR', p .. 'next_uid')
    redis.call('SET', p .. 'uid:' .. uid, ikey)
    redis.call('INCR', p .. 'user_count')
    is_new = 1
  end
  redis.call('HSET', ukey, 'uid', uid, 'openid', openid, 'created_at', now)
  if appid ~= '' then redis.call('HSET', ukey, 'appid', appid) end
end
redis.call('HSET', ukey, 'session_key', key, 'updated_at', now)
bind_unionid(p, ukey, uid, unionid)
return {is_new, tonumber(uid), redis.call('HGET', ukey, 'unionid') or ''}
