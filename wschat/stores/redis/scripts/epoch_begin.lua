-- A worker's first step when it (re)connects, before it raises its sequences
-- (wschat.stores.redis.epoch). The epoch names the data Redis holds and the run of
-- Redis that holds it ("<token>:<run_id>"): a worker that finds none, another token, or
-- one named before Redis restarted, knows that Redis lost its data or may hold older
-- sequences than workers delivered (a snapshot, a failover to a replica behind).
-- KEYS: epoch ready recovering nodes control (the channel every worker listens on:
--       told "epoch" when a loss is found, so that none waits for its next heartbeat)
--       numbered_by_database (while it exists, ready is not set: gate.lua)
-- ARGV: node_id, the epoch this worker last saw ('' if none), a new token, the time
--       limit in ms, Redis's run_id ('' if INFO is refused), database ('1': this worker
--       numbers messages in the database), then the other nodes this worker knew of
-- Returns {state, epoch}: 0 the same data as before; 1 Redis lost or rolled back its
-- data and this worker must raise its sequences before posts are taken again (it is
-- listed in recovering); 2 a fresh start (no epoch, and this worker saw none: posts
-- are taken at once; a worker that saw no epoch has no sequence to raise, and this is
-- also the first start of a release with epochs over the data of one without); 3 lost,
-- but posts were taken again already (recovering is over). A third element: 1 if this
-- worker numbers in the database and was not listed (first start, a loss of the data,
-- or its listing ran out meanwhile), else 0.
-- A database-numbering worker lists itself first, as its heartbeat does (node_beat.lua):
-- after a loss of Redis's data the list went with it, and the recovery this begins may be
-- over (the last epoch_done) before its next heartbeat; a first start has not beaten yet.
local anew = 0
if ARGV[6] == '1' then
  local t = redis.call('TIME')
  -- listed until its beat plus the time limit (PRESENCE_TTL), as node_beat.lua lists it
  anew = redis.call('ZADD', KEYS[6], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[4]),
             ARGV[1])
  redis.call('DEL', KEYS[2])
end
local current = redis.call('GET', KEYS[1])
local run = ARGV[5]
if current and (run == '' or string.sub(current, -#run - 1) == ':' .. run) then
  if current == ARGV[2] or ARGV[2] == '' then
    -- Still listed: its recovery was begun (by itself, or a peer listed it) and not
    -- done (it failed half way): it raises its sequences again and says so.
    if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return {1, current, anew} end
    return {0, current, anew}
  end
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('SADD', KEYS[3], ARGV[1])  -- keeps the set's time limit
    return {1, current, anew}
  end
  return {3, current, anew}
end
local epoch = ARGV[3] .. ':' .. run
redis.call('SET', KEYS[1], epoch)
if ARGV[2] == '' and not current then
  if redis.call('EXISTS', KEYS[6]) == 0 then redis.call('SET', KEYS[2], '1') end
  return {2, epoch, anew}
end
redis.call('DEL', KEYS[2])
-- Waited for: this worker, those it knew of, and those the registry lists as alive
-- (it survives a restart that kept the data).
redis.call('SADD', KEYS[3], ARGV[1])
for i = 7, #ARGV do redis.call('SADD', KEYS[3], ARGV[i]) end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], now - tonumber(ARGV[4]), '+inf')) do
  redis.call('SADD', KEYS[3], node)
end
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('PUBLISH', KEYS[5], 'epoch')
return {1, epoch, anew}
