local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local want, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if limit >= 0 and used + want > limit then want = limit - used end
if want < 1 then return {0, used} end
used = redis.call('INCRBY', KEYS[1], want)
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return {want, used}
