local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local mode, n, max, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local all = redis.call('HGETALL', KEYS[1])
local others, mine = 0, 0
for i = 1, #all, 2 do
  local v = all[i + 1]
  local sep = string.find(v, ':', 1, true)
  local held, exp = tonumber(string.sub(v, 1, sep - 1)), tonumber(string.sub(v, sep + 1))
  if exp <= now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] == ARGV[1] then
    mine = held
  else
    others = others + held
  end
end
local target = n
if mode == 'add' then target = mine + n end
if max >= 0 and others + target > max then target = max - others end
if mode == 'add' and target < mine then target = mine end
if target <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return {0, 0, others}
end
redis.call('HSET', KEYS[1], ARGV[1], target .. ':' .. (now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl * 2)
local granted = target - mine
if granted < 0 then granted = 0 end
return {granted, target, others + target}
