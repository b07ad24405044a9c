-- A user's typing indicator in a room, over every worker and pod: each worker that has
-- connections of hers typing there holds a field (its node id -> until when, Redis's clock
-- in ms; each worker counts its own connections as one). `typing: true` goes to the room
-- when the first worker starts holding it on, `typing: false` when the last one stops, so
-- two tabs on two pods are one typist, as two tabs on one worker are. A field left by a
-- worker that died counts until its time is up (the clients expire the indicator anyway).
-- The HSET is the first write: a Redis at maxmemory refuses it (OOM), and the event goes
-- out then as if no other worker held the indicator (typing goes on while Redis is full).
-- KEYS: typists room_channel   ARGV: node for_ms (0: this worker's connections stopped) payload
-- Reply: 1 published, 0 not (another worker holds the indicator on, or no change).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = redis.call('HGETALL', KEYS[1])
local mine, others, lapsed = false, false, {}
for i = 1, #held, 2 do
  local live = tonumber(held[i + 1]) > now
  if held[i] == ARGV[1] then
    mine = live
  elseif live then
    others = true
  else
    lapsed[#lapsed + 1] = held[i]  -- a worker's that stopped without telling
  end
end
local typing_for = tonumber(ARGV[2])
local changed
if typing_for > 0 then
  local kept = redis.pcall('HSET', KEYS[1], ARGV[1], now + typing_for)
  -- The key outlives the latest time by a minute: a worker's stop comes a timer step
  -- after its time is up, and must still find its field to tell the room.
  local keep_ms = typing_for + 60000
  if not (type(kept) == 'table' and kept.err) and redis.call('PTTL', KEYS[1]) < keep_ms then
    redis.call('PEXPIRE', KEYS[1], keep_ms)
  end
  changed = not (mine or others)
else
  changed = redis.call('HDEL', KEYS[1], ARGV[1]) == 1 and not others
end
if #lapsed > 0 then redis.call('HDEL', KEYS[1], unpack(lapsed)) end
if not changed then return 0 end
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
