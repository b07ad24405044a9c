-- The start of post_room.lua and post_dm.lua: no id is taken while Redis is
-- recovering from a loss of its data ({5, ''}: unavailable), so that no room or DM
-- id is issued twice (wschat.stores.redis.epoch). Its keys are spelled out here
-- (keys.py: EPOCH, READY, RECOVERING): every message pays one EXISTS, and the
-- scripts' KEYS keep their layout.
-- READY exists: posts are taken. Else they are refused while the epoch is missing
-- (Redis lost its data and no worker has noticed yet) or some worker that knew the
-- old data is still raising its sequences (RECOVERING, a set with a time limit);
-- the first post after both cleared opens the gate for the others.
if redis.call('EXISTS', 'wschat:ready') == 0 then
  if redis.call('EXISTS', 'wschat:epoch') == 0 or redis.call('EXISTS', 'wschat:recovering') == 1 then
    return {5, ''}
  end
  redis.call('SET', 'wschat:ready', '1')
end
