-- KEYS: the user's counter for one minute. ARGV: the counter's lifetime in seconds.
-- Counts one call to WeChat; returns the minute's count so far, this call included.
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
