-- The newest messages of a room's history within a byte bound: the replay of a `join`
-- with `since`, or a `history` page. Read newest first, a few at a time, so that at most
-- the bound and one message are read (and none of it leaves Redis past the bound).
-- KEYS: seq hist
-- ARGV: after_id (-1: none) before_id (0: none) limit (0: none) max_bytes at_least_one
-- Returns {last_id, oldest_id, cut, event...}: the room's sequence, the id of the oldest
-- message the history holds (last_id + 1 when it holds none), 1 if a message within the
-- ids and the limit was left out because the bytes would have come to more than
-- max_bytes (at_least_one = 1: never the newest one), then the events, oldest first.
local after = tonumber(ARGV[1])
local before = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local max_bytes = tonumber(ARGV[4])
local at_least_one = ARGV[5] == '1'
local pattern = '^{"type":"message","id":(%d+),'
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local oldest = last + 1
local first = redis.call('LINDEX', KEYS[2], 0)
if first then
  -- not a message (never stored so): its id unknown, taken as newer than any `since`,
  -- so that no replay over it is called complete
  oldest = tonumber(string.match(first, pattern) or '9007199254740991')
end
local picked, total, cut, done = {}, 0, 0, false
local hi = redis.call('LLEN', KEYS[2]) - 1
while not done and hi >= 0 do
  local lo = math.max(0, hi - 31)
  local chunk = redis.call('LRANGE', KEYS[2], lo, hi)
  for i = #chunk, 1, -1 do
    local msg = chunk[i]
    local id = tonumber(string.match(msg, pattern) or '0')
    if id > 0 and id <= after then
      done = true
      break
    end
    if (id > after) and (before == 0 or id < before) then
      if limit > 0 and #picked >= limit then
        done = true
        break
      end
      total = total + #msg
      if total > max_bytes and not (at_least_one and #picked == 0) then
        cut = 1
        done = true
        break
      end
      picked[#picked + 1] = msg
    end
  end
  hi = lo - 1
end
local out = {last, oldest, cut}
for i = #picked, 1, -1 do
  out[#out + 1] = picked[i]
end
return out
