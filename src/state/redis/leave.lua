redis.call('ZREM', KEYS[1], ARGV[1])
local v = redis.call('HGET', KEYS[2], ARGV[1])
if v and string.sub(v, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. ':' then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 1
