-- KEYS: the code's key. ARGV: lifetime in seconds. Books the code (`pending`) and returns nil, or
-- returns the booking another broker holds (`pending` or `done`).
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], 'pending', 'EX', ARGV[1])
return false
