-- The revocation feed (included ahead of the scripts that use it): the stream `revocations` of
-- events kept until their `until`; `revocations:origin` ('ms-0 unix_seconds', set at its first
-- use) and `revocations:horizon` (the id of the newest event dropped).

-- The feed's origin, set now (server time for the id, `now` for the time) if it has none yet.
local function feed_origin(p, now)
  local okey = p .. 'revocations:origin'
  local origin = redis.call('GET', okey)
  if not origin then
    local t = redis.call('TIME')
    origin = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)) .. '-0 ' .. now
    redis.call('SET', okey, origin)
  end
  return origin
end

-- Appends an event of `fields` at `now` when the feed is on (`keep` > 0), kept `keep` seconds;
-- drops the oldest events past their `until`.
local function record_revocation(p, now, keep, fields)
  if keep <= 0 then return end
  feed_origin(p, now)
  local key = p .. 'revocations'
  local args = {'XADD', key, '*'}
  for _, v in ipairs(fields) do args[#args + 1] = v end
  args[#args + 1] = 'at'
  args[#args + 1] = tostring(now)
  args[#args + 1] = 'until'
  args[#args + 1] = tostring(now + keep)
  redis.call(unpack(args))
  for _, entry in ipairs(redis.call('XRANGE', key, '-', '+', 'COUNT', 100)) do
    local f, until_ = entry[2], nil
    for i = 1, #f, 2 do
      if f[i] == 'until' then until_ = tonumber(f[i + 1]) end
    end
    if until_ and until_ >= now then break end
    redis.call('XDEL', key, entry[1])
    redis.call('SET', p .. 'revocations:horizon', entry[1])
  end
end
