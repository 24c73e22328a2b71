-- ARGV: openid, now, unionid ('' for none), field, value[, expected current value of the field:
-- if it holds another, it is kept]. Returns the user's fields, or nil.
local p, openid, now, unionid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ukey = p .. 'user:' .. openid
local uid = redis.call('HGET', ukey, 'uid')
if not uid then return false end
bind_unionid(p, ukey, uid, unionid)
if not ARGV[7] or redis.call('HGET', ukey, ARGV[5]) == ARGV[7] then
  redis.call('HSET', ukey, ARGV[5], ARGV[6])
end
redis.call('HSET', ukey, 'updated_at', now)
return redis.call('HGETALL', ukey)
