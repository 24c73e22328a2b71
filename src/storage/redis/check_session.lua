-- ARGV: id, now, idle_ttl, step. Returns {uid, openid, unionid or '', deadline, appid or ''}, or
-- nil when the session is unknown or dead (then it is deleted).
local p, id = ARGV[1], ARGV[2]
local now, idle, step = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local skey = p .. 'session:' .. id
local s = redis.call('HMGET', skey, 'uid', 'openid', 'unionid', 'last_seen', 'expires_at', 'appid')
if not s[1] then return false end
local last_seen, expires_at = tonumber(s[4]), tonumber(s[5])
local deadline = math.min(last_seen + idle, expires_at)
if now >= deadline then
  redis.call('DEL', skey)
  redis.call('ZREM', p .. 'sessions:' .. s[1], id)
  return false
end
if now - last_seen >= step then
  deadline = math.min(now + idle, expires_at)
  redis.call('HSET', skey, 'last_seen', now)
  redis.call('PEXPIRE', skey, (deadline - now) * 1000)
end
return {s[1], s[2], s[3] or '', deadline, s[6] or ''}
