local d = tonumber(redis.call('GET', KEYS[1]) or '0')
local m = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('DEL', KEYS[1], KEYS[2])
return {d, m}
