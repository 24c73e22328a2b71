-- ARGV: id, now, idle_ttl, keep (seconds a revocation stays in the feed; 0: the feed is off).
-- Returns 1 if a live session ended (and records it in the feed), 0 if it was dead, -1 if unknown.
local p, id, now, idle = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local keep = tonumber(ARGV[5])
local skey = p .. 'session:' .. id
local s = redis.call('HMGET', skey, 'uid', 'last_seen', 'expires_at')
if not s[1] then return -1 end
redis.call('DEL', skey)
redis.call('ZREM', p .. 'sessions:' .. s[1], id)
if now >= math.min(tonumber(s[2]) + idle, tonumber(s[3])) then return 0 end
record_revocation(p, now, keep, {'uid', s[1], 'sid', id})
return 1
