"""The Lua scripts behind ``mtaio.resources.redis``: each limiter call is one of them.

Every script runs atomically on the Redis server and reads the **server's** clock
(``TIME``), so processes on hosts with skewed clocks agree. Key names and every value reach
the scripts as ``KEYS`` / ``ARGV``; nothing user-supplied is ever spliced into this text.
The scripts are loaded once per client and run with ``EVALSHA`` (``register_script``).

Requires Redis >= 6.0 (BLPOP with a fractional timeout). Scripts that call ``TIME`` and
then write rely on effects replication, the default since Redis 5.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CONCURRENCY_ACQUIRE",
    "CONCURRENCY_COUNT",
    "CONCURRENCY_LEAVE",
    "CONCURRENCY_RELEASE",
    "CONCURRENCY_RENEW",
    "RATE_ACQUIRE",
    "RATE_LEVEL",
    "RATE_REFUND",
]

# -- RedisRateLimiter: GCRA -------------------------------------------------------------------
#
# KEYS[1] holds the theoretical arrival time (TAT) of the bucket, the server time at which
# the bucket is full again, and the number of the latest reservation:
# "<seconds> <microseconds> <n>". Seconds and microseconds are apart so that arithmetic
# happens on the *debt* (TAT - now, a small number) and keeps sub-microsecond precision
# whatever the epoch (a double holding epoch microseconds only resolves 0.25 us).
#
# With T = 1/rate and tau = capacity * T (both in microseconds, computed by the client):
#   debt      = max(0, TAT - now)            tokens in the bucket = (tau - debt) / T
#   new debt  = debt + tokens * T
#   wait      = max(0, new debt - tau)       when the request may proceed
# A granted request (wait within the caller's limit) moves TAT to now + new debt: it
# *reserves* its slot even when it has to wait, so a waiting caller needs no second round
# trip. The key expires when the bucket is full again (PX = new debt).
#
# n numbers the reservations of the key, one more each; a fresh key starts from the server
# time in microseconds, above any number a previous life of the key handed out (scripts take
# more than a microsecond each). A reservation can only be given back while it is the latest
# one (its n is still stored): then TAT goes back by its cost and n by one, which is exactly
# the state had it never been made, and the one before it becomes the latest again. An
# earlier reservation cannot: the ones after it already hold their slots, and moving TAT
# back would let new requests bunch behind them beyond the bucket's bound.

_RATE_PRELUDE: Final = """
local tonumber, floor, ceil = tonumber, math.floor, math.ceil
local t = redis.call('TIME')
local now_s, now_us = tonumber(t[1]), tonumber(t[2])
local function parse(raw)  -- debt (us) and the latest reservation's number
  if not raw then return 0, now_s * 1000000 + now_us end
  local s, us, n = string.match(raw, '^(%-?%d+) (%S+) (%d+)$')
  s, us, n = tonumber(s), tonumber(us), tonumber(n)
  if not s or not us or not n then
    return redis.error_reply('mtaio: key ' .. KEYS[1] .. ' does not hold a rate limiter')
  end
  local debt = (s - now_s) * 1000000 + (us - now_us)
  if debt < 0 then return 0, n end
  return debt, n
end
local function store(debt, n)
  local at = now_us + debt
  local carry = floor(at / 1000000)
  local value = string.format('%d %.17g %d', now_s + carry, at - carry * 1000000, n)
  redis.call('PSETEX', KEYS[1], ceil(debt / 1000), value)
end
"""

RATE_ACQUIRE: Final = (
    _RATE_PRELUDE
    + """
-- ARGV: cost (us), tau (us), longest acceptable wait (us; negative: no limit),
--       and optionally 1 to also get the server time (tests and benchmarks)
-- returns 0 when granted at once, -1 - wait when refused (integers: the cheapest replies to
-- parse), or "<wait> <n>" when granted after a wait of <wait> us (rounded up): the caller
-- sleeps, and may give reservation <n> back
local cost = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local debt, n = parse(redis.call('GET', KEYS[1]))
if type(debt) == 'table' then return debt end
local new_debt = debt + cost
local wait = new_debt - tau
if wait < 0 then wait = 0 end
wait = ceil(wait)
if max_wait >= 0 and wait > max_wait then
  wait = -1 - wait
else
  n = n + 1
  store(new_debt, n)
end
if ARGV[4] == '1' then return {wait, now_s, now_us, string.format('%d', n)} end
if wait > 0 then return string.format('%d %d', wait, n) end
return wait
"""
)
"""Take (or reserve) ``cost`` microseconds of the bucket; see the return value above."""

RATE_REFUND: Final = (
    _RATE_PRELUDE
    + """
-- ARGV: cost (us) and number of a reservation whose caller gave up before using it
-- returns 1 if it was given back, 0 if a later reservation keeps it in place
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local debt, n = parse(raw)
if type(debt) == 'table' then return debt end
if n ~= tonumber(ARGV[2]) then return 0 end
debt = debt - tonumber(ARGV[1])
if debt <= 0 then
  redis.call('DEL', KEYS[1])
else
  store(debt, n - 1)
end
return 1
"""
)
"""Give the latest reservation back: as if it had never been made."""

RATE_LEVEL: Final = (
    _RATE_PRELUDE
    + """
-- returns the debt in us as a string (read-only)
local debt = parse(redis.call('GET', KEYS[1]))
if type(debt) == 'table' then return debt end
return string.format('%.17g', debt)
"""
)
"""The bucket's debt (microseconds of tokens owed), for ``fetch_available()``."""

# -- RedisConcurrencyLimiter: leases and a FIFO queue -----------------------------------------
#
# KEYS[1] holders  sorted set: holder id -> lease expiry (server ms)
# KEYS[2] queue    sorted set: waiter id -> arrival number (from KEYS[4])
# KEYS[3] alive    sorted set: waiter id -> expiry of the waiter's registration (server ms)
# KEYS[4] sequence counter giving arrival numbers
# ARGV[1] limit, ARGV[2] lease (ms), ARGV[3] prefix of the per-instance wake-up lists.
#
# Ids are "<instance>:<n>". The instance that queued a waiter BLPOPs "<prefix><instance>";
# a grant pushes the waiter's id there. All keys share the "{key}" hash tag, so the lists
# built here from ARGV[3] live in the same cluster slot as KEYS.
#
# Invariant kept by admit(), which every script runs: after it, either the queue is empty or
# every permit is held. So a newcomer that finds a free permit overtakes nobody, and a
# release hands its permit straight to the head of the queue (no thundering herd, no
# barging). Expired leases and registrations of waiters that stopped renewing (crashed or
# partitioned processes) are purged first, so their permits come back.

_CONCURRENCY_PRELUDE: Final = """
local holders, queue, alive, sequence = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local prefix = ARGV[3]
local function keep(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
local function admit()
  redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
  local dead = redis.call('ZRANGEBYSCORE', alive, '-inf', now)
  for i = 1, #dead do redis.call('ZREM', queue, dead[i]) end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', alive, '-inf', now) end
  local room = limit - redis.call('ZCARD', holders)
  if room <= 0 then return end
  local heads = redis.call('ZRANGE', queue, 0, room - 1)
  for i = 1, #heads do
    local id = heads[i]
    -- The new lease runs as long as the waiter's registration: a waiter that died just
    -- before its grant gives the permit back when its registration would have expired.
    local expiry = tonumber(redis.call('ZSCORE', alive, id)) or (now + lease)
    redis.call('ZREM', queue, id)
    redis.call('ZREM', alive, id)
    redis.call('ZADD', holders, expiry, id)
    keep(holders, expiry - now)
    local list = prefix .. string.match(id, '^[^:]*')
    redis.call('RPUSH', list, id)
    redis.call('PEXPIRE', list, 2 * lease)
  end
end
local function earliest()
  local first = redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) - now end
  return -1
end
local function state(id)
  if redis.call('ZSCORE', holders, id) then return 1 end
  if redis.call('ZSCORE', queue, id) then return 0 end
  return -1
end
"""

CONCURRENCY_ACQUIRE: Final = (
    _CONCURRENCY_PRELUDE
    + """
-- ARGV[4] id, ARGV[5] 1 to queue if no permit is free (0: only if free now),
-- ARGV[6] most waiters allowed in the queue (negative: no limit)
-- returns -1 granted, -2 nothing free now, -3 queue full, or, when queued, the ms until
-- the earliest lease expires (>= 0: after admit() a non-empty queue means a full house)
local id = ARGV[4]
admit()
local s = state(id)
if s == 1 then return -1 end  -- a repeated call (client retry) changes nothing
if s == 0 then return earliest() end
if redis.call('ZCARD', holders) < limit then
  redis.call('ZADD', holders, now + lease, id)
  keep(holders, lease)
  return -1
end
if tonumber(ARGV[5]) == 0 then return -2 end
local most = tonumber(ARGV[6])
if most >= 0 and redis.call('ZCARD', queue) >= most then return -3 end
redis.call('ZADD', queue, redis.call('INCR', sequence), id)
redis.call('ZADD', alive, now + lease, id)
keep(queue, lease)
keep(alive, lease)
keep(sequence, lease)
return earliest()
"""
)
"""Take a permit, or join the queue: see the return values in the script."""

CONCURRENCY_RELEASE: Final = (
    _CONCURRENCY_PRELUDE
    + """
-- ARGV[4] id; returns 1 if it held a permit, 0 if its lease had already expired
local released = redis.call('ZREM', holders, ARGV[4])
admit()
return released
"""
)
"""Give a permit back; the head of the queue gets it."""

CONCURRENCY_LEAVE: Final = (
    _CONCURRENCY_PRELUDE
    + """
-- ARGV[4] id of a waiter that gives up, ARGV[5] 1 to also give back a permit granted to it
-- returns 0 left the queue (held nothing), 1 it holds a permit (released if ARGV[5] = 1),
-- -1 unknown (expired or never arrived)
local id = ARGV[4]
admit()
local s = state(id)
if s == 0 then
  redis.call('ZREM', queue, id)
  redis.call('ZREM', alive, id)
elseif s == 1 and tonumber(ARGV[5]) == 1 then
  redis.call('ZREM', holders, id)
  admit()
end
return s
"""
)
"""A waiter leaves (timeout, cancellation, close): whatever it holds or queues for goes."""

CONCURRENCY_RENEW: Final = (
    _CONCURRENCY_PRELUDE
    + """
-- ARGV[4..] ids of one instance (holders and waiters)
-- returns {ms to the earliest lease expiry, state of each id: 1 holds, 0 queued, -1 gone}
-- Renew first: an entry that expired a moment ago but was not purged yet was never given
-- to anyone else, so extending it keeps the count exact.
local until_ = now + lease
local queued = false
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', holders, id) then
    redis.call('ZADD', holders, 'XX', until_, id)
  elseif redis.call('ZSCORE', alive, id) then
    redis.call('ZADD', alive, 'XX', until_, id)
    queued = true
  end
end
keep(holders, lease)
if queued then
  keep(queue, lease)
  keep(alive, lease)
  keep(sequence, lease)
end
admit()
local out = {earliest()}
for i = 4, #ARGV do out[#out + 1] = state(ARGV[i]) end
return out
"""
)
"""Extend the leases and registrations of one instance, and report where each id stands."""

CONCURRENCY_COUNT: Final = (
    _CONCURRENCY_PRELUDE
    + """
-- returns {permits held, waiters queued} (unexpired ones; read-only)
return {redis.call('ZCOUNT', holders, '(' .. now, '+inf'),
        redis.call('ZCOUNT', alive, '(' .. now, '+inf')}
"""
)
"""How many permits are held and how many waiters queue, across all processes."""
