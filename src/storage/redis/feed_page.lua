-- ARGV: after (an id), limit, now. Returns {origin, horizon or '', newest id or '', the events
-- after `after` (up to `limit`)}; sets the origin if the feed has none yet.
local p, after, limit, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local origin = feed_origin(p, now)
local key = p .. 'revocations'
local horizon = redis.call('GET', p .. 'revocations:horizon') or ''
local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
local last = ''
if newest[1] then last = newest[1][1] end
local events = {}
if limit > 0 then events = redis.call('XRANGE', key, '(' .. after, '+', 'COUNT', limit) end
return {origin, horizon, last, events}
