-- ARGV: uid, now, idle_ttl. Returns {{id, created_at, last_seen, deadline}, ...} of the live
-- sessions of the user, oldest first.
local p, uid, now, idle = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local rows = {}
for _, id in ipairs(redis.call('ZRANGE', p .. 'sessions:' .. uid, 0, -1)) do
  local s = redis.call('HMGET', p .. 'session:' .. id, 'created_at', 'last_seen', 'expires_at')
  if s[1] then
    local deadline = math.min(tonumber(s[2]) + idle, tonumber(s[3]))
    if now < deadline then
      table.insert(rows, {id, tonumber(s[1]), tonumber(s[2]), deadline})
    end
  end
end
return rows
