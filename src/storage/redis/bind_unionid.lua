-- Included ahead of the scripts that change a user's unionid.
-- Makes `unionid` the unionid of the user at `ukey` (uid `uid`) and keeps the unionid index in
-- step with it: the old unionid's entry goes. An empty unionid changes nothing.
local function bind_unionid(p, ukey, uid, unionid)
  if unionid == '' then return end
  local old = redis.call('HGET', ukey, 'unionid')
  if old and old ~= unionid then redis.call('DEL', p .. 'unionid:' .. old) end
  redis.call('HSET', ukey, 'unionid', unionid)
  redis.call('SET', p .. 'unionid:' .. unionid, uid)
end
