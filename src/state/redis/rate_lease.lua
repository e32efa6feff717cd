local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local t, tau, want, need = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local n = math.floor((now + tau - tat) / t)
if n > want then n = want end
if n < need then
  return {0, tat + need * t - now - tau, 0}
end
tat = tat + n * t
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {n, 0, math.floor((now + tau - tat) / t)}
