if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  local used = redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('EXPIREAT', KEYS[1], ARGV[2])
  return {1, used}
end
return {0, tonumber(redis.call('GET', KEYS[1]) or '0')}
