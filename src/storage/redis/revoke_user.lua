-- ARGV: uid, now, idle_ttl, keep (seconds a revocation stays in the feed; 0: the feed is off).
-- Ends every session of the user and records it in the feed; returns how many were live.
local p, uid, now, idle = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local keep = tonumber(ARGV[5])
local zkey = p .. 'sessions:' .. uid
local live = {}
for _, id in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
  local skey = p .. 'session:' .. id
  local s = redis.call('HMGET', skey, 'last_seen', 'expires_at')
  if s[1] then
    if now < math.min(tonumber(s[1]) + idle, tonumber(s[2])) then live[#live + 1] = id end
    redis.call('DEL', skey)
  end
end
redis.call('DEL', zkey)
record_revocation(p, now, keep, {'uid', uid, 'nbf', tostring(now), 'sids', table.concat(live, ',')})
return #live
