-- ARGV: 'uid' | 'openid' | 'unionid', value. Returns the user's fields, or nil.
local p, kind, value = ARGV[1], ARGV[2], ARGV[3]
local openid = false
if kind == 'openid' then
  openid = value
elseif kind == 'uid' then
  openid = redis.call('GET', p .. 'uid:' .. value)
else
  local uid = redis.call('GET', p .. 'unionid:' .. value)
  if uid then openid = redis.call('GET', p .. 'uid:' .. uid) end
end
if not openid then return false end
local fields = redis.call('HGETALL', p .. 'user:' .. openid)
if #fields == 0 then return false end
return fields
