-- Included ahead of the scripts that change a user's unionid.
-- Makes `unionid` the unionid of the identity at `ukey` (uid `uid`) and keeps the unionid index
-- in step with it: the index names the uid that first held a unionid (an identity that gets one
-- later keeps its own uid and takes no other's), and an old unionid's entry goes if it named
-- this uid and this is the uid's first identity (one that joined the uid leaves the entry to
-- the first, which still holds it). An empty unionid changes nothing.
local function bind_unionid(p, ukey, uid, unionid)
  if unionid == '' then return end
  local old = redis.call('HGET', ukey, 'unionid')
  local first = p .. 'user:' .. (redis.call('GET', p .. 'uid:' .. uid) or '') == ukey
  if old and old ~= unionid and first
      and redis.call('GET', p .. 'unionid:' .. old) == tostring(uid) then
    redis.call('DEL', p .. 'unionid:' .. old)
  end
  redis.call('HSET', ukey, 'unionid', unionid)
  redis.call('SET', p .. 'unionid:' .. unionid, uid, 'NX')
end
