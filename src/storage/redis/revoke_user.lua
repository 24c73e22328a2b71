-- ARGV: uid, now, idle_ttl. Ends every session of the user; returns how many were live.
local p, uid, now, idle = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local zkey = p .. 'sessions:' .. uid
local live = 0
for _, id in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
  local skey = p .. 'session:' .. id
  local s = redis.call('HMGET', skey, 'last_seen', 'expires_at')
  if s[1] then
    if now < math.min(tonumber(s[1]) + idle, tonumber(s[2])) then live = live + 1 end
    redis.call('DEL', skey)
  end
end
redis.call('DEL', zkey)
return live
