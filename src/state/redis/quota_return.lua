local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = tonumber(ARGV[1])
if n > used then n = used end
if n < 1 then return used end
return redis.call('DECRBY', KEYS[1], n)
