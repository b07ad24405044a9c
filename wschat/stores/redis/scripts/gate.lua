-- The start of post_room.lua and post_dm.lua: no id is taken in Redis while it is
-- recovering from a loss of its data ({5, ''}: unavailable), nor while a worker that
-- numbers messages in the database lives ({6, the node id of one}: unavailable, named in
-- the log; persistence turned on or off by a rolling update, and two numberings of one
-- room would issue an id twice), so that no room or DM id is issued twice
-- (wschat.stores.redis.epoch, nodes.py). Its keys are spelled out here (keys.py: READY,
-- NUMBERED_BY_DATABASE, EPOCH, RECOVERING): every message pays one EXISTS, and the
-- scripts' KEYS keep their layout.
-- READY exists: posts are taken. It is never set while a database-numbering worker
-- lives (its heartbeat deletes it; the epoch scripts and this one do not set it then).
-- Else posts are refused while such a worker lives, while the epoch is missing (Redis
-- lost its data and no worker has noticed yet) or while some worker that knew the old
-- data is still raising its sequences (RECOVERING, a set with a time limit); the first
-- post after all cleared opens the gate for the others.
if redis.call('EXISTS', 'wschat:ready') == 0 then
  local database = redis.call('ZRANGE', 'wschat:numbered_by_database', 0, 0)
  if database[1] then return {6, database[1]} end
  if redis.call('EXISTS', 'wschat:epoch') == 0 or redis.call('EXISTS', 'wschat:recovering') == 1 then
    return {5, ''}
  end
  redis.call('SET', 'wschat:ready', '1')
end
