"""The Lua half of the Redis backend: commit, snapshot reads, scans and read-view leases.

Why Lua at all: a commit must check the writer's lease, apply every write as one new version
and release the lock in one atomic step on the metadata's node, and a read view must read a
key as of its sequence; no Redis command does either. redis-py's ``Script`` (via
``register_script``) runs each by SHA and reloads it on NOSCRIPT (a restarted node).

Every script touches only keys of the store's metadata hash tag ``{P}`` (``KEYS[1]`` is
``{P}:seq``, which routes the call in a cluster; the other keys are derived from ``ARGV[1]``,
the tag ``{P}`` itself, and share its slot; in the Lua ``P`` names the tag). Layout, ``ks`` a
keyspace name, ``HDR`` the 16-digit zero-padded commit sequence number of a version:

- ``{P}:seq``                 last committed sequence number
- ``{P}:lock``                the write lock's token (redis-py's Lock: SET NX PX; fenced here)
- ``{P}:v:<ks>``   HASH       key -> HDR .. value (for out-of-line keyspaces the value is a data key name)
- ``{P}:i:<ks>``   ZSET       current keys, score 0 (ZRANGEBYLEX is the ordered scan)
- ``{P}:H:<ks>:<key>`` ZSET   history of one key: score = seq that replaced it,
                              member = HDR(seq) .. old encoded value ("" when it was absent)
- ``{P}:hk:<ks>``  ZSET       keys that have history (so scans see keys deleted after a view began)
- ``{P}:T``        ZSET       trim queue: score = seq, member = HDR(seq) .. ks .. "\\0" .. key
- ``{P}:rs`` / ``{P}:rx``     open read views: score = their sequence / their lease expiry (ms)
- ``{P}:pend``     HASH       out-of-line data keys written by the lock holder, not yet committed
- ``{P}:free``     SET        data keys no version references any more (deleted by clients)
- ``{P}:done:<token>``        the sequence a writer's commit made, kept while redis-py may still
                              resend it: a commit replayed after its reply was lost (a connection
                              error) answers as committed instead of "lock lost"

History is written only while a read view is open (a view that opens later reads at a sequence
at least as new), and trimmed once no open view is older than it.
"""

from __future__ import annotations

from typing import Any

from redis.commands.core import Script

__all__ = ["HDR_DIGITS", "Scripts"]

HDR_DIGITS = 16

_PRELUDE = """
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function check_view(id)
  if not redis.call('ZSCORE', P .. ':rs', id) then
    return redis.error_reply('DSEXPIRED read view expired')
  end
end
-- The encoded value of ks/key as of sequence S (false when absent then), or an error reply.
local function value_at(ks, key, S)
  local cur = redis.call('HGET', P .. ':v:' .. ks, key)
  if cur and tonumber(string.sub(cur, 1, 16)) <= S then return cur end
  local h = redis.call('ZRANGEBYSCORE', P .. ':H:' .. ks .. ':' .. key, '(' .. S, '+inf', 'LIMIT', 0, 1)
  if #h == 0 then
    if cur then return redis.error_reply('DSEXPIRED history of a read view was trimmed') end
    return false
  end
  if #h[1] == 16 then return false end
  return string.sub(h[1], 17)
end
"""

OPEN_VIEW = (
    _PRELUDE
    + """
-- ARGV: P, view id, lease ms. Registers the view at the current sequence; returns it.
local seq = tonumber(redis.call('GET', P .. ':seq') or '0')
redis.call('ZADD', P .. ':rs', seq, ARGV[2])
redis.call('ZADD', P .. ':rx', now_ms() + tonumber(ARGV[3]), ARGV[2])
return seq
"""
)

GET_AT = (
    _PRELUDE
    + """
-- ARGV: P, view id, S, ks, key.
local err = check_view(ARGV[2])
if err then return err end
return value_at(ARGV[4], ARGV[5], tonumber(ARGV[3]))
"""
)

SCAN_AT = (
    _PRELUDE
    + """
-- ARGV: P, view id ("" = current state, for the lock holder), S, ks, lex min, lex max, limit.
-- Returns {#a, #b, key, value, ...}: a = current keys in range, b = keys with history in range
-- (each list at most limit long, in key order); values as of S (nil when absent then).
local id, ks, limit = ARGV[2], ARGV[4], tonumber(ARGV[7])
local a = redis.call('ZRANGEBYLEX', P .. ':i:' .. ks, ARGV[5], ARGV[6], 'LIMIT', 0, limit)
local b = {}
local out = {}
if id == '' then
  out[1] = #a
  out[2] = 0
  for _, key in ipairs(a) do
    out[#out + 1] = key
    out[#out + 1] = redis.call('HGET', P .. ':v:' .. ks, key)
  end
  return out
end
local err = check_view(id)
if err then return err end
local S = tonumber(ARGV[3])
b = redis.call('ZRANGEBYLEX', P .. ':hk:' .. ks, ARGV[5], ARGV[6], 'LIMIT', 0, limit)
out[1] = #a
out[2] = #b
for _, list in ipairs({a, b}) do
  for _, key in ipairs(list) do
    local v = value_at(ks, key, S)
    if type(v) == 'table' and v.err then return v end
    out[#out + 1] = key
    out[#out + 1] = v
  end
end
return out
"""
)

INTENT = """
-- ARGV: P, token, lease ms, data keys... Records the data keys the lock holder is about to
-- write and renews its lease.
local P = ARGV[1]
if redis.call('GET', P .. ':lock') ~= ARGV[2] then return redis.error_reply('DSLOCK write lock lost') end
redis.call('PEXPIRE', P .. ':lock', ARGV[3])
for i = 4, #ARGV do redis.call('HSET', P .. ':pend', ARGV[i], ARGV[2]) end
return #ARGV - 3
"""

COMMIT = (
    _PRELUDE
    + """
-- ARGV: P, token, replay ms (how long a replay is recognized), n_ooc, ooc keyspaces..., n_data, data keys..., n_writes,
--       (ks, key, op 'p'|'d', value)..., trim budget.
-- Applies the writes as one new version if the caller still holds the lock, then releases it.
-- Returns {seq, size of the free set}.
local token = ARGV[2]
local done = redis.call('GET', P .. ':done:' .. token)
if done then return {tonumber(done), redis.call('SCARD', P .. ':free')} end
if redis.call('GET', P .. ':lock') ~= token then return redis.error_reply('DSLOCK write lock lost') end
local i = 4
local ooc = {}
for _ = 1, tonumber(ARGV[i]) do i = i + 1; ooc[ARGV[i]] = true end
i = i + 1
local n_data = tonumber(ARGV[i])
for j = i + 1, i + n_data do
  if redis.call('HGET', P .. ':pend', ARGV[j]) ~= token then
    return redis.error_reply('DSLOCK intent of a data key lost')
  end
end
for j = i + 1, i + n_data do redis.call('HDEL', P .. ':pend', ARGV[j]) end
i = i + n_data + 1
-- Whatever else is pending was written by earlier lock holders that never committed.
local stale = redis.call('HKEYS', P .. ':pend')
for _, d in ipairs(stale) do redis.call('SADD', P .. ':free', d) end
if #stale > 0 then redis.call('DEL', P .. ':pend') end

local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', P .. ':rx', '-inf', now)
for _, id in ipairs(expired) do
  redis.call('ZREM', P .. ':rs', id)
  redis.call('ZREM', P .. ':rx', id)
end
local keep = redis.call('ZCARD', P .. ':rs') > 0
local seq = redis.call('INCR', P .. ':seq')
local hdr = string.format('%016d', seq)

for _ = 1, tonumber(ARGV[i]) do
  local ks, key, op, val = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  i = i + 4
  local vk = P .. ':v:' .. ks
  local old = redis.call('HGET', vk, key)
  if keep then
    redis.call('ZADD', P .. ':H:' .. ks .. ':' .. key, seq, hdr .. (old or ''))
    redis.call('ZADD', P .. ':hk:' .. ks, 0, key)
    redis.call('ZADD', P .. ':T', seq, hdr .. ks .. '\\0' .. key)
  elseif old and ooc[ks] then
    redis.call('SADD', P .. ':free', string.sub(old, 17))
  end
  if op == 'p' then
    redis.call('HSET', vk, key, hdr .. val)
    if not old then redis.call('ZADD', P .. ':i:' .. ks, 0, key) end
  elseif old then
    redis.call('HDEL', vk, key)
    redis.call('ZREM', P .. ':i:' .. ks, key)
  end
end
i = i + 1

-- Trim history no open view can need: entries replaced at or before the oldest view's sequence.
local bound = seq
local oldest = redis.call('ZRANGE', P .. ':rs', 0, 0, 'WITHSCORES')
if #oldest > 0 then bound = tonumber(oldest[2]) end
local items = redis.call('ZRANGEBYSCORE', P .. ':T', '-inf', bound, 'LIMIT', 0, tonumber(ARGV[i]))
for _, m in ipairs(items) do
  local rest = string.sub(m, 17)
  local z = string.find(rest, '\\0', 1, true)
  local ks, key = string.sub(rest, 1, z - 1), string.sub(rest, z + 1)
  local hk = P .. ':H:' .. ks .. ':' .. key
  if ooc[ks] then
    for _, o in ipairs(redis.call('ZRANGEBYSCORE', hk, '-inf', bound)) do
      if #o > 32 then redis.call('SADD', P .. ':free', string.sub(o, 33)) end
    end
  end
  redis.call('ZREMRANGEBYSCORE', hk, '-inf', bound)
  if redis.call('EXISTS', hk) == 0 then redis.call('ZREM', P .. ':hk:' .. ks, key) end
  redis.call('ZREM', P .. ':T', m)
end
redis.call('DEL', P .. ':lock')
redis.call('SET', P .. ':done:' .. token, seq, 'PX', ARGV[3])
return {seq, redis.call('SCARD', P .. ':free')}
"""
)


class Scripts:
    """The scripts registered with one client (redis-py ``Script``: EVALSHA, loaded on NOSCRIPT).

    Each call passes ``{P}:seq`` as its one key (it routes the call to the metadata's node in a
    cluster) and the tag ``{P}`` as its first argument.
    """

    def __init__(self, client: Any, seq_key: str, tag: str) -> None:
        self._seq_key = seq_key
        self._tag = tag
        self.open_view: Script = client.register_script(OPEN_VIEW)
        self.get_at: Script = client.register_script(GET_AT)
        self.scan_at: Script = client.register_script(SCAN_AT)
        self.intent: Script = client.register_script(INTENT)
        self.commit: Script = client.register_script(COMMIT)

    def __call__(self, script: Script, *args: bytes | str | int, client: Any = None) -> Any:
        """Run ``script`` with this store's key and tag, on ``client`` (a pipeline) if given."""
        return script(keys=[self._seq_key], args=[self._tag, *args], client=client)
