-- ARGV: uid, unionid. Puts the unionid on every session of the user.
local p, uid, unionid = ARGV[1], ARGV[2], ARGV[3]
for _, id in ipairs(redis.call('ZRANGE', p .. 'sessions:' .. uid, 0, -1)) do
  local skey = p .. 'session:' .. id
  if redis.call('EXISTS', skey) == 1 then redis.call('HSET', skey, 'unionid', unionid) end
end
return 1
