-- ARGV: 'uid' | 'key' (an identity key) | 'unionid', value. Returns {the identity's fields,
-- {appid or '', openid, ...} of every identity of its uid (the first, then the others by key)}, or
-- nil.
local p, kind, value = ARGV[1], ARGV[2], ARGV[3]
local ikey = false
if kind == 'key' then
  ikey = value
elseif kind == 'uid' then
  ikey = redis.call('GET', p .. 'uid:' .. value)
else
  local uid = redis.call('GET', p .. 'unionid:' .. value)
  if uid then ikey = redis.call('GET', p .. 'uid:' .. uid) end
end
if not ikey then return false end
local fields = redis.call('HGETALL', p .. 'user:' .. ikey)
if #fields == 0 then return false end
local uid = redis.call('HGET', p .. 'user:' .. ikey, 'uid')
local keys = redis.call('SMEMBERS', p .. 'identities:' .. uid)
table.sort(keys)
local first = redis.call('GET', p .. 'uid:' .. uid)
if first then table.insert(keys, 1, first) end
local ids = {}
for _, k in ipairs(keys) do
  local f = redis.call('HMGET', p .. 'user:' .. k, 'uid', 'appid', 'openid')
  if f[1] == uid then
    ids[#ids + 1] = f[2] or ''
    ids[#ids + 1] = f[3]
  end
end
return {fields, ids}
