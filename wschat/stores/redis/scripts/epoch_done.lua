-- A worker has raised its sequences after Redis lost its data: it is no longer
-- waited for. The last one opens the gate (gate.lua) for every worker's posts.
-- KEYS: epoch ready recovering numbered_by_database
-- ARGV: node_id, the epoch its sequences were raised in, database ('1': this worker
--       numbers messages in the database: it never opens the gate, gate.lua)
-- Returns 1 if posts are taken now, else 0 (other workers still raising, or the
-- data lost again meanwhile: the next begin finds no epoch, or another one; a worker
-- listed for that one stays listed until it raised its sequences in that data).
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
-- While a worker numbers messages in the database, the gate stays shut (gate.lua).
if ARGV[3] == '1' or redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
redis.call('SET', KEYS[2], '1')
return 1
