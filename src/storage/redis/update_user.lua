-- ARGV: openid, now, unionid ('' for none), field, value[, expected current value of the field:
-- if it holds another, it is kept]. Returns the user's fields, nil when there is no such user, or
-- 0 when the unionid (from encrypted data, which the client can tamper with) differs from the
-- user's own or is bound to another uid: then nothing is written.
local p, openid, now, unionid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ukey = p .. 'user:' .. openid
local uid = redis.call('HGET', ukey, 'uid')
if not uid then return false end
if unionid ~= '' then
  local own = redis.call('HGET', ukey, 'unionid')
  local holder = redis.call('GET', p .. 'unionid:' .. unionid)
  if (own and own ~= unionid) or (holder and holder ~= uid) then return 0 end
end
bind_unionid(p, ukey, uid, unionid)
if not ARGV[7] or redis.call('HGET', ukey, ARGV[5]) == ARGV[7] then
  redis.call('HSET', ukey, ARGV[5], ARGV[6])
end
redis.call('HSET', ukey, 'updated_at', now)
return redis.call('HGETALL', ukey)
