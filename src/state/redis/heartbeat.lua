local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[3], epoch)
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], now, 'PX', ttl * 2)
end
local born = tonumber(redis.call('GET', KEYS[2]) or now)
local owners = redis.call('HGETALL', KEYS[4])
local dup = 0
for i = 1, #owners, 2 do
  local v = owners[i + 1]
  local sep = string.find(v, ':', 1, true)
  local exp = tonumber(string.sub(v, sep + 1))
  if exp <= now then
    redis.call('HDEL', KEYS[4], owners[i])
  elseif owners[i] == ARGV[1] and string.sub(v, 1, sep - 1) ~= ARGV[4] then
    dup = 1
  end
end
if dup == 1 and ARGV[5] == 'join' then
  return {0, 0, now - born, epoch, 1}
end
if dup == 0 then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[4] .. ':' .. (now + ttl))
end
redis.call('PEXPIRE', KEYS[4], ttl * 2)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(members)
for i, m in ipairs(members) do
  if m == ARGV[1] then return {#members, i - 1, now - born, epoch, dup} end
end
return {#members, 0, now - born, epoch, dup}
