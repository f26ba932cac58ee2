"""Limits shared across processes and hosts, kept in Redis (``pip install 'mtaio[redis]'``).

``RedisRateLimiter`` and ``RedisConcurrencyLimiter`` have the API of :class:`RateLimiter`
and :class:`ConcurrencyLimiter`, but their state lives in Redis, so every worker process on
every host that names the same key shares one limit. They are built on ``redis.asyncio``:
pass the client your application already has.

Each call is one Lua script (one round trip) that runs atomically on the server and reads
the **server's** clock, so hosts with skewed clocks agree. Failures are explicit: Redis
unreachable, too slow (``command_timeout``) or a script error raises ``ResourceError`` with
the cause chained; nothing ever passes through unlimited.

What cannot be the same as in-process (each needs a round trip): ``try_acquire`` is a
coroutine, ``available`` / ``in_use`` become ``await fetch_available()`` /
``await fetch_in_use()``, and ``RedisConcurrencyLimiter.release()`` starts the release at
once and returns an awaitable for its outcome. See ``docs/redis.md``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, ParamSpec, Protocol, Self, TypeVar, overload

try:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mtaio.resources.redis needs the redis package: pip install 'mtaio[redis]'"
    ) from exc

from mtaio._core._shared import (
    acquire_before_running,
    hold_while_running,
    non_negative,
    optional_non_negative,
    positive,
    positive_int,
)
from mtaio.exceptions import ResourceError, ResourceLimitError
from mtaio.resources import _redis_scripts as scripts

__all__ = ["DEFAULT_COMMAND_TIMEOUT", "RedisConcurrencyLimiter", "RedisRateLimiter"]

P = ParamSpec("P")
T = TypeVar("T")
P2 = ParamSpec("P2")
T2 = TypeVar("T2")

#: Seconds one Redis round trip may take before the call fails with ``ResourceError``
#: (covers the client's own retries and a server that accepts but never answers).
DEFAULT_COMMAND_TIMEOUT: Final = 5.0
#: As ``RateLimiter``: the bucket holds at least 2 ms of tokens, so that a caller woken a
#: little late (timers are ~1 ms granular) does not lose rate (SPEC §2's effective capacity).
CATCH_UP: Final = 0.002
#: The longest single BLPOP of the wake-up listener (also at most 80 % of socket_timeout).
MAX_BLOCK: Final = 10.0
#: The shortest BLPOP (Redis takes a fractional timeout; 0 would mean "forever").
MIN_BLOCK: Final = 0.005
#: Margin added to a lease expiry before the listener re-checks it (server rounding).
RECHECK_MARGIN: Final = 0.002
# What CONCURRENCY_ACQUIRE returns, besides the ms to the earliest expiry when queued.
GRANTED: Final = -1
NOTHING_FREE: Final = -2
QUEUE_FULL: Final = -3


class _LimitDecorator(Protocol):
    """What ``limiter.limit()`` returns: a decorator that keeps the function's types."""

    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, T]], /
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...


# -- argument checks ----------------------------------------------------------------------------


def _client(value: object) -> Redis:
    if not isinstance(value, Redis):
        raise TypeError(
            f"redis must be a redis.asyncio.Redis client, got {type(value).__name__} {value!r}"
        )
    return value


def _key(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"key must be a str, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError("key must be a non-empty str, got ''")
    return value


def _amount(tokens: object) -> float:
    """``tokens`` as a float: a finite number >= 0."""
    if type(tokens) is int or type(tokens) is float:
        amount = float(tokens)
        if 0.0 <= amount < math.inf:
            return amount
    return non_negative("tokens", tokens)


def _command_timeout(value: object) -> float | None:
    return None if value is None else positive("command_timeout", value)


def _non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _copy(error: ResourceError) -> ResourceError:
    """One exception per task that raises it, with the same message and cause."""
    copy = ResourceError(error.message)
    copy.__cause__ = error.__cause__
    return copy


# -- what both limiters share -------------------------------------------------------------------


class _RedisLimiter:
    """Round trips with explicit failures, background clean-up, loop binding, closing.

    Invariants:

    - ``_calls`` maps each task inside a Redis call (``_guard``) to its deadline;
      ``_watchdog`` is armed (at ``_watchdog_when``) whenever ``_calls`` is non-empty, no
      later than its earliest deadline; ``_expired`` holds the tasks the watchdog cancelled
      that have not left ``_guard`` yet.
    - ``_background`` holds the clean-up round trips still running (refunds, releases,
      leaves); each removes itself when done and its failure is consumed there, because a
      clean-up that cannot reach Redis is covered by expiry (a refund that never lands only
      makes the limit stricter; a permit never given back returns when its lease runs out).
    """

    _redis: Redis
    _key: str
    _command_timeout: float | None
    _closed: bool
    _loop: asyncio.AbstractEventLoop | None
    _waiting: int
    _background: set[asyncio.Task[Any]]

    def _setup(self, redis: object, key: object, command_timeout: object) -> None:
        self._redis = _client(redis)
        self._key = _key(key)
        self._command_timeout = _command_timeout(command_timeout)
        self._closed = False
        self._loop = None
        self._waiting = 0
        self._background = set()
        self._calls: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_when = math.inf

    @property
    def key(self) -> str:
        """The Redis key (or, for the concurrency limiter, the hash tag) naming this limit."""
        return self._key

    @property
    def waiting(self) -> int:
        """Tasks of **this** instance inside ``acquire()`` that have not returned yet."""
        return self._waiting

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    def _name(self) -> str:
        return type(self).__name__

    def _check_open(self) -> None:
        if self._closed:
            raise ResourceError(f"{self._name()} {self._key!r} is closed")

    def _closed_while_waiting(self) -> ResourceError:
        return ResourceError(f"{self._name()} {self._key!r} was closed while the task waited")

    def _bind(self) -> asyncio.AbstractEventLoop:
        """The running loop; refused while tasks of another loop wait on this instance."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._waiting:
                raise RuntimeError(
                    f"{self!r} is used from event loop {loop!r} while tasks wait on it in "
                    f"{self._loop!r}; a limiter is used from one event loop at a time"
                )
            self._loop = loop
        return loop

    async def _guard(self, call: Awaitable[T], extra: float = 0.0) -> T:
        """Await one Redis call (a script run: EVALSHA, loading the script once if the
        server lacks it); any failure becomes ``ResourceError`` with the cause chained.

        A call still unanswered ``command_timeout + extra`` seconds after it started is
        cancelled by the watchdog and fails as a timeout. The watchdog is one timer per
        limiter, not one per call (``asyncio.timeout`` would cost more than the rest of this
        method): each call only registers its deadline in ``_calls``.
        """
        timeout = self._command_timeout
        if timeout is None:
            try:
                return await call
            except (RedisError, OSError) as exc:
                raise self._failed(exc) from exc
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        deadline = loop.time() + timeout + extra
        self._calls[task] = deadline
        if self._watchdog is None or deadline < self._watchdog_when:
            self._arm_watchdog(loop, deadline)
        try:
            return await call
        except asyncio.CancelledError:
            # Only the watchdog's own cancellation becomes a timeout; one from outside (or
            # both at once) stays a cancellation, as with asyncio.timeout.
            if task in self._expired and task.uncancel() == 0:
                message = f"Redis did not answer within {timeout + extra:g} s"
                raise ResourceError(f"{self._name()} {self._key!r}: {message}") from TimeoutError(
                    message
                )
            raise
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        finally:
            del self._calls[task]
            self._expired.discard(task)

    def _failed(self, exc: BaseException) -> ResourceError:
        return ResourceError(
            f"{self._name()} {self._key!r}: Redis call failed: {type(exc).__name__}: {exc}"
        )

    def _arm_watchdog(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = loop.call_at(when, self._bark, loop)
        self._watchdog_when = when

    def _bark(self, loop: asyncio.AbstractEventLoop) -> None:
        """The watchdog fires: cancel the calls past their deadline, re-arm for the rest.

        A task in ``_calls`` is always suspended inside its ``await call``, so the
        cancellation lands there and ``_guard`` turns it into the timeout.
        """
        self._watchdog = None
        now = loop.time()
        soonest = math.inf
        for task, deadline in self._calls.items():
            if deadline <= now:
                if task not in self._expired:
                    self._expired.add(task)
                    task.cancel()
            elif deadline < soonest:
                soonest = deadline
        if soonest < math.inf:
            self._arm_watchdog(loop, soonest)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # consumed: see the class docstring

    async def _drain(self) -> None:
        """Wait for the clean-up round trips started so far."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


# -- RedisRateLimiter ---------------------------------------------------------------------------


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RedisRateLimiter(_RedisLimiter):
    """Token bucket shared through Redis: ``rate`` tokens per second, up to ``burst`` at once.

    The bucket is one GCRA *theoretical arrival time* per key, moved atomically by one Lua
    script per call on the Redis server's clock. A request that must wait **reserves** its
    slot in that same round trip and sleeps exactly until it. A task that leaves before
    using its slot (cancelled, or the limiter closed) gives the reservation back if no later
    reservation was made meanwhile; otherwise the slot stays unused (the later ones, maybe
    in other processes, hold theirs and cannot move up): the limit errs on the strict side.

    Every process sharing ``key`` must use the same ``rate`` and ``burst``: each call is
    judged with the parameters of the instance that makes it.

    Invariants: ``_interval_us`` is ``1e6 / rate`` (microseconds per token) and ``_tau_us``
    the effective capacity ``max(burst, rate * 2 ms)`` in microseconds, both recomputed on
    every ``rate`` / ``burst`` change; ``_sleepers`` holds the future of every task sleeping
    on a reservation (``close()`` fails them); ``_waiting`` counts tasks inside
    ``acquire()``.
    """

    def __init__(
        self,
        redis: Redis,
        key: str,
        rate: float,
        burst: float | None = None,
        *,
        max_wait: float | None = None,
        command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self._setup(redis, key, command_timeout)
        self._rate = positive("rate", rate)
        self._burst_auto = burst is None
        self._burst = max(1.0, self._rate) if burst is None else positive("burst", burst)
        self._max_wait = optional_non_negative("max_wait", max_wait)
        self._keys = (self._key,)
        self._acquire_script = self._redis.register_script(scripts.RATE_ACQUIRE)
        self._refund_script = self._redis.register_script(scripts.RATE_REFUND)
        self._level_script = self._redis.register_script(scripts.RATE_LEVEL)
        self._sleepers: set[asyncio.Future[None]] = set()
        self._configure()

    # -- public API -------------------------------------------------------------------------

    async def acquire(self, tokens: float = 1, *, timeout: float | None = None) -> None:
        """Wait until ``tokens`` can be taken from the shared bucket, then take them.

        Raises ``ResourceLimitError`` without waiting if ``tokens > burst`` or if the wait
        would exceed ``timeout`` (or ``max_wait`` when ``timeout`` is ``None``); its
        ``retry_after`` is that wait. ``ResourceError`` after ``close()`` or when Redis
        fails.
        """
        await self._take(_amount(tokens), timeout)

    async def try_acquire(self, tokens: float = 1) -> bool:
        """Take ``tokens`` if the bucket has them now (nobody holds a reservation ahead).

        A coroutine (it needs a round trip). Raises ``ResourceLimitError`` if
        ``tokens > burst``, ``ResourceError`` after ``close()`` or when Redis fails.
        """
        amount = _amount(tokens)
        self._check_open()
        self._bind()
        if amount == 0.0:
            return True
        self._check_burst(amount)
        wait: int = await self._guard(
            self._acquire_script(self._keys, (amount * self._interval_us, self._tau_us, 0.0))
        )
        return wait == 0

    @overload
    def limit(
        self, func: Callable[P, Coroutine[Any, Any, T]], *, tokens: float = 1
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def limit(self, func: None = None, *, tokens: float = 1) -> _LimitDecorator: ...

    def limit(
        self, func: Callable[P, Coroutine[Any, Any, T]] | None = None, *, tokens: float = 1
    ) -> Callable[P, Coroutine[Any, Any, T]] | _LimitDecorator:
        """Decorate an ``async def`` so that every call first acquires ``tokens``.

        ``@limiter.limit``, ``@limiter.limit(tokens=2)`` or ``limiter.limit(func, tokens=2)``.
        Tokens are not refunded if the function raises.
        """
        amount = non_negative("tokens", tokens)
        if func is None:

            def decorate(
                func: Callable[P2, Coroutine[Any, Any, T2]], /
            ) -> Callable[P2, Coroutine[Any, Any, T2]]:
                return acquire_before_running(self.acquire, amount, func)

            return decorate
        return acquire_before_running(self.acquire, amount, func)

    async def __aenter__(self) -> Self:
        """``async with limiter``: acquire one token (through ``self.acquire``)."""
        await self.acquire()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Leaving the block gives nothing back: tokens are spent, not held."""

    def close(self) -> None:
        """Refuse every later call; tasks sleeping on a reservation get ``ResourceError``
        and give their reservation back. Idempotent. Other processes are not affected."""
        if self._closed:
            return
        self._closed = True
        for future in self._sleepers:
            if not future.done():
                future.set_exception(self._closed_while_waiting())

    async def aclose(self) -> None:
        """``close()``, then wait until the reservations given back have reached Redis."""
        self.close()
        await self._drain()

    async def fetch_available(self) -> float:
        """Tokens in the shared bucket now (one round trip; 0 while reservations are due)."""
        debt = float(await self._guard(self._level_script(self._keys, ())))
        return max(0.0, (self._tau_us - debt) / self._interval_us)

    @property
    def rate(self) -> float:
        """Tokens per second (> 0). Settable: applies to this instance's next calls."""
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        self._rate = positive("rate", value)
        if self._burst_auto:
            self._burst = max(1.0, self._rate)
        self._configure()

    @property
    def burst(self) -> float:
        """The bucket's configured capacity. Settable; ``None`` means ``max(1, rate)``,
        kept in step with later ``rate`` changes."""
        return self._burst

    @burst.setter
    def burst(self, value: float | None) -> None:
        self._burst = max(1.0, self._rate) if value is None else positive("burst", value)
        self._burst_auto = value is None
        self._configure()

    @property
    def max_wait(self) -> float | None:
        """The longest wait ``acquire`` accepts when called without ``timeout``."""
        return self._max_wait

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"<{self._name()} key={self._key!r} rate={self._rate!r}/s burst={self._burst:g} "
            f"waiting={self._waiting}{state}>"
        )

    # -- internals --------------------------------------------------------------------------

    def _configure(self) -> None:
        self._interval_us = 1e6 / self._rate
        self._tau_us = max(self._burst, self._rate * CATCH_UP) * self._interval_us

    async def _take(
        self, amount: float, timeout: float | None, *, dated: bool = False
    ) -> float | None:
        """``acquire()``. With ``dated``, returns the server time (s) of the slot granted
        (for tests and benchmarks: it costs a longer reply), else ``None``."""
        self._check_open()
        if timeout is not None:
            timeout = non_negative("timeout", timeout)
        loop = self._bind()
        if amount == 0.0:
            return None
        self._check_burst(amount)
        limit = self._max_wait if timeout is None else timeout
        cost = amount * self._interval_us
        args: tuple[float, ...] = (cost, self._tau_us, -1.0 if limit is None else limit * 1e6)
        self._waiting += 1
        try:
            # A task cancelled during this round trip may have reserved its slot without
            # learning it: that slot is lost (the limit errs on the strict side), never
            # granted twice.
            if dated:
                wait, now_s, now_us, number = await self._guard(
                    self._acquire_script(self._keys, (*args, 1))
                )
            else:
                wait = await self._guard(self._acquire_script(self._keys, args))
                if type(wait) is not int:  # "<wait> <number>": a reservation to sleep on
                    wait, number = wait.split()
                    wait = int(wait)
            if wait < 0:
                seconds = (-1 - wait) / 1e6
                which = "max_wait" if timeout is None else "timeout"
                raise ResourceLimitError(
                    f"{self._name()} {self._key!r}: {amount:g} tokens need a wait of "
                    f"{seconds:.6g} s, more than the {which} of {limit:g} s",
                    retry_after=seconds,
                )
            if wait > 0:
                await self._sleep(loop, wait / 1e6, cost, number)
            return float(now_s) + (now_us + wait) / 1e6 if dated else None
        finally:
            self._waiting -= 1

    async def _sleep(
        self, loop: asyncio.AbstractEventLoop, delay: float, cost: float, number: bytes | str
    ) -> None:
        """Sleep until the reserved slot; leaving early for any reason tries to give the
        reservation (``number``) back."""
        future: asyncio.Future[None] = loop.create_future()
        if self._closed:
            # close() ran while this task's reservation was on its way back from Redis.
            future.set_exception(self._closed_while_waiting())
        timer = loop.call_later(delay, _wake, future)
        self._sleepers.add(future)
        try:
            await future
        except BaseException:
            # Cancelled (or the limiter closed) before or just after the slot: nobody used
            # these tokens. If no later reservation was made (the usual case for the last
            # waiter), the refund script undoes this one exactly; otherwise the slot stays
            # unused, since the later reservations, maybe in other processes, already hold
            # theirs and cannot move up (see _redis_scripts). Sent in the background so
            # that the cancellation is not delayed by a round trip.
            timer.cancel()
            self._spawn(self._guard(self._refund_script(self._keys, (cost, number))))
            raise
        finally:
            self._sleepers.discard(future)

    def _check_burst(self, amount: float) -> None:
        if amount > self._burst:
            raise ResourceLimitError(
                f"{self._name()} {self._key!r}: {amount:g} tokens can never be granted: "
                f"more than the burst of {self._burst:g}",
                retry_after=None,
            )


# -- RedisConcurrencyLimiter --------------------------------------------------------------------


class RedisConcurrencyLimiter(_RedisLimiter):
    """At most ``limit`` holders at once across every process sharing ``key``; FIFO.

    Permits are **leases**: a holder id in a Redis sorted set with an expiry, renewed in the
    background (every ``lease / 3`` s, one task per instance for all its holders and
    waiters) while held, so the permit of a crashed or partitioned process comes back after
    at most ``lease`` seconds. Waiters queue in Redis in arrival order; a release hands the
    permit straight to the head of the queue and pushes the waiter's id onto its instance's
    wake-up list, which one listener task per instance watches with ``BLPOP``.

    Invariants (between steps, on the loop's thread):

    - ``_held`` holds the ids of the permits granted to this instance and not released
      (an ordered set: permits are counted, not owned, so ``release()`` gives back any).
      ``_lost`` is the subset whose lease Redis no longer has (reported at release).
    - ``_waiters`` maps each id queued in Redis, as far as this instance knows, to the
      future its task awaits; whoever resolves a future removes its id first (result
      ``True``: granted, and the id is in ``_held``; ``False``: the wait timed out).
    - ``_renewer`` runs while ``_held`` or ``_waiters`` is non-empty; ``_listener`` runs
      while ``_waiters`` is non-empty.
    """

    def __init__(
        self,
        redis: Redis,
        key: str,
        limit: int,
        *,
        lease: float = 30.0,
        max_wait: float | None = None,
        max_waiting: int | None = None,
        command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self._setup(redis, key, command_timeout)
        self._capacity = positive_int("limit", limit)
        self._lease = positive("lease", lease)
        self._max_wait = optional_non_negative("max_wait", max_wait)
        self._max_waiting = (
            None if max_waiting is None else _non_negative_int("max_waiting", max_waiting)
        )
        if self._redis.single_connection_client:
            raise ValueError(
                "redis must use a connection pool (single_connection_client=False): the "
                "wake-up listener blocks one connection in BLPOP"
            )
        tag = "{" + self._key + "}"  # every key in one cluster slot
        self._keys = (f"{tag}:holders", f"{tag}:queue", f"{tag}:alive", f"{tag}:sequence")
        self._prefix = f"{tag}:wake:"
        self._instance = uuid.uuid4().hex
        self._wake_key = self._prefix + self._instance
        self._ids = itertools.count(1)
        self._acquire_script = self._redis.register_script(scripts.CONCURRENCY_ACQUIRE)
        self._release_script = self._redis.register_script(scripts.CONCURRENCY_RELEASE)
        self._leave_script = self._redis.register_script(scripts.CONCURRENCY_LEAVE)
        self._renew_script = self._redis.register_script(scripts.CONCURRENCY_RENEW)
        self._count_script = self._redis.register_script(scripts.CONCURRENCY_COUNT)
        self._held: dict[str, None] = {}
        self._lost: set[str] = set()
        self._waiters: dict[str, asyncio.Future[bool]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._recheck_at = math.inf
        socket_timeout = self._redis.connection_pool.connection_kwargs.get("socket_timeout")
        self._max_block = (
            MAX_BLOCK
            if not socket_timeout
            else max(MIN_BLOCK, min(MAX_BLOCK, 0.8 * float(socket_timeout)))
        )

    # -- public API -------------------------------------------------------------------------

    async def acquire(self, *, timeout: float | None = None) -> None:
        """Wait for a permit (FIFO across every process sharing the key), then hold it.

        Raises ``ResourceLimitError`` when no permit came within ``timeout`` (or
        ``max_wait``; ``0`` means only if one is free now), or at once when ``max_waiting``
        waiters already queue (across all processes); nothing is held afterwards.
        ``ResourceError`` after ``close()`` or when Redis fails.
        """
        self._check_open()
        if timeout is not None:
            timeout = non_negative("timeout", timeout)
        limit = self._max_wait if timeout is None else timeout
        loop = self._bind()
        member = f"{self._instance}:{next(self._ids)}"
        self._waiting += 1
        try:
            try:
                reply: int = await self._guard(
                    self._acquire_script(
                        self._keys,
                        (
                            *self._argv(),
                            member,
                            0 if limit == 0 else 1,
                            -1 if self._max_waiting is None else self._max_waiting,
                        ),
                    )
                )
            except BaseException:
                # Cancelled or failed mid-call: the script may have run. Leave the queue and
                # give back a permit it may have got (lease expiry covers a lost message).
                self._spawn(self._leave(member))
                raise
            if reply == GRANTED:
                self._hold(member)
                return
            if reply == NOTHING_FREE:
                raise ResourceLimitError(
                    f"{self._name()} {self._key!r}: no permit free now "
                    f"(timeout=0, capacity={self._capacity})",
                    retry_after=None,
                )
            if reply == QUEUE_FULL:
                raise ResourceLimitError(
                    f"{self._name()} {self._key!r}: no permit free and {self._max_waiting} "
                    f"waiters already queue (max_waiting={self._max_waiting}): request shed",
                    retry_after=None,
                )
            # Queued: ``reply`` is the ms until the earliest lease in Redis runs out.
            await self._wait(loop, member, reply, limit)
        finally:
            self._waiting -= 1

    async def try_acquire(self) -> bool:
        """Take a permit if one is free now and nobody queues for it (a coroutine)."""
        try:
            await self.acquire(timeout=0)
        except ResourceLimitError:
            return False
        return True

    def release(self) -> asyncio.Future[None]:
        """Give back one permit held through this instance; the head of the queue gets it.

        Starts the release at once; await the returned future to learn its outcome (it
        raises ``ResourceError`` if Redis failed or if the permit's lease had already
        expired, i.e. it may have been given to someone else meanwhile). Not awaiting it is
        fine: a release that never reaches Redis comes back when its lease runs out.
        Raises ``ResourceError`` at once if this instance holds no permit. Works after
        ``close()``.
        """
        loop = asyncio.get_running_loop()
        member = self._pop_held()
        if member in self._lost:
            self._lost.discard(member)
            future: asyncio.Future[None] = loop.create_future()
            future.set_exception(self._lease_lost())
            future.exception()  # consumed unless awaited: the caller may ignore it
            return future
        return self._spawn(self._release(member))

    @overload
    def limit(
        self, func: Callable[P, Coroutine[Any, Any, T]], /
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def limit(self, func: None = None, /) -> _LimitDecorator: ...

    def limit(
        self, func: Callable[P, Coroutine[Any, Any, T]] | None = None, /
    ) -> Callable[P, Coroutine[Any, Any, T]] | _LimitDecorator:
        """Decorator: every call of the ``async`` function runs inside ``async with self``.

        Use it bare (``@limiter.limit``) or called (``@limiter.limit()``).
        """
        if func is None:
            return self._decorate
        return hold_while_running(self, func)

    async def __aenter__(self) -> Self:
        """``async with limiter``: acquire a permit (through ``self.acquire``)."""
        await self.acquire()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Release the permit on every exit path; raises ``ResourceError`` if the release
        failed or the lease had expired while the block ran."""
        member = self._pop_held()
        if member in self._lost:
            self._lost.discard(member)
            raise self._lease_lost()
        try:
            await self._release(member)
        except asyncio.CancelledError:
            # The release may not have reached Redis: send it again (it is idempotent).
            self._spawn(self._release(member, quiet=True))
            raise

    def close(self) -> None:
        """Refuse later ``acquire`` / ``try_acquire``; tasks of this instance waiting for a
        permit get ``ResourceError``. Holders keep their permits (and their leases are
        renewed) until they release. Idempotent. Other processes are not affected."""
        if self._closed:
            return
        self._closed = True
        for member in list(self._waiters):
            self._resolve(member, self._closed_while_waiting())
        if self._listener is not None:
            self._listener.cancel()

    async def aclose(self) -> None:
        """``close()``, then wait until the clean-up sent to Redis has landed; stops the
        renewal task if no permit is held any more."""
        self.close()
        await self._drain()
        renewer = self._renewer
        if renewer is not None and not self._held:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    async def fetch_in_use(self) -> int:
        """Permits held now across all processes (one round trip)."""
        reply = await self._guard(self._count_script(self._keys, self._argv()))
        return int(reply[0])

    async def fetch_waiting(self) -> int:
        """Waiters queued now across all processes (one round trip)."""
        reply = await self._guard(self._count_script(self._keys, self._argv()))
        return int(reply[1])

    @property
    def capacity(self) -> int:
        """The limit. Settable: this instance's later calls use it, and waiters queued in
        Redis are admitted at once if it grew. Every process sharing the key should agree."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._capacity = positive_int("capacity", value)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # the next call admits with the new capacity
        self._spawn(self._sync())

    @property
    def lease(self) -> float:
        """Seconds a permit outlives the last renewal of its holder's process."""
        return self._lease

    @property
    def max_wait(self) -> float | None:
        """The longest wait ``acquire`` accepts when called without ``timeout``."""
        return self._max_wait

    @property
    def max_waiting(self) -> int | None:
        """Most waiters allowed in the shared queue before requests are shed."""
        return self._max_waiting

    @property
    def held(self) -> int:
        """Permits held through **this** instance (granted, not yet released)."""
        return len(self._held)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"<{self._name()} key={self._key!r} capacity={self._capacity} "
            f"lease={self._lease:g}s held={len(self._held)} waiting={self._waiting}{state}>"
        )

    # -- waiting ----------------------------------------------------------------------------

    def _argv(self) -> tuple[int, int, str]:
        return (self._capacity, max(1, math.ceil(self._lease * 1000)), self._prefix)

    async def _wait(
        self, loop: asyncio.AbstractEventLoop, member: str, hint: int, limit: float | None
    ) -> None:
        """Queued in Redis: wait for the grant, the timeout, or a failure."""
        future: asyncio.Future[bool] = loop.create_future()
        self._waiters[member] = future
        if self._closed:
            # close() ran while the request was on its way to the queue: leave it again.
            self._resolve(member, self._closed_while_waiting())
        else:
            self._note(hint)
            self._ensure_renewer()
            self._ensure_listener()
        timer = None if limit is None else loop.call_later(limit, self._expire, member)
        try:
            granted = await future
        except BaseException:
            # Cancelled while queued or after the grant, closed, or Redis failed.
            if timer is not None:
                timer.cancel()
            if self._waiters.pop(member, None) is None and self._granted(future):
                # Granted, but acquire() never returned: give one permit back (counted, not
                # owned: another task may have released this very id already).
                self._give_back(member)
            else:
                # Queued as far as this instance knows: leave the queue, and give back a
                # grant that raced with this exit (LEAVE with release=1 does both).
                self._spawn(self._leave(member))
            raise
        if timer is not None:
            timer.cancel()
        if granted:
            return
        # Timed out locally; the grant may still have happened in Redis meanwhile.
        try:
            state = await self._guard(self._leave_script(self._keys, (*self._argv(), member, 0)))
        except BaseException:
            self._spawn(self._leave(member))
            raise
        if state == 1:
            self._hold(member)
            return
        raise ResourceLimitError(
            f"{self._name()} {self._key!r}: no permit became free within {limit:g} s "
            f"(capacity={self._capacity})",
            retry_after=None,
        )

    @staticmethod
    def _granted(future: asyncio.Future[bool]) -> bool:
        """Did ``future`` resolve as a grant (whatever was thrown into its task since)?"""
        if not future.done() or future.cancelled() or future.exception() is not None:
            return False
        return future.result()

    def _expire(self, member: str) -> None:
        """The waiter's ``timeout`` / ``max_wait`` ran out (the timer callback)."""
        future = self._waiters.pop(member, None)
        if future is not None and not future.done():
            future.set_result(False)

    def _give_back(self, member: str) -> None:
        """Release one held permit, ``member`` if it is still held, in the background."""
        if not self._held:
            return
        other = member if member in self._held else next(reversed(self._held))
        del self._held[other]
        self._lost.discard(other)
        self._spawn(self._release(other, quiet=True))

    def _hold(self, member: str) -> None:
        self._held[member] = None
        self._ensure_renewer()

    def _pop_held(self) -> str:
        if not self._held:
            raise ResourceError(
                f"release() without a matching acquire(): this instance holds no permit ({self!r})"
            )
        member, _ = self._held.popitem()
        return member

    def _resolve(self, member: str, outcome: bool | BaseException) -> None:
        """Settle the waiter ``member``: granted (``True``) or failed (an exception)."""
        future = self._waiters.pop(member, None)
        if future is None or future.done():
            return  # not waiting here any more: its own clean-up covers it
        if outcome is True:
            self._hold(member)
            future.set_result(True)
        elif isinstance(outcome, BaseException):
            future.set_exception(outcome)

    def _note(self, hint: int) -> None:
        """Remember when the earliest lease in Redis runs out: the safety re-check."""
        if hint >= 0:
            now = asyncio.get_running_loop().time()
            self._recheck_at = now + hint / 1000 + RECHECK_MARGIN
        else:
            self._recheck_at = math.inf

    def _lease_lost(self) -> ResourceError:
        return ResourceError(
            f"{self._name()} {self._key!r}: the permit's lease had expired before release "
            f"(no renewal reached Redis for {self._lease:g} s), so it may have been granted "
            "to someone else meanwhile"
        )

    # -- round trips ------------------------------------------------------------------------

    async def _release(self, member: str, *, quiet: bool = False) -> None:
        released = await self._guard(self._release_script(self._keys, (*self._argv(), member)))
        if not released and not quiet:
            raise self._lease_lost()

    async def _leave(self, member: str) -> None:
        await self._guard(self._leave_script(self._keys, (*self._argv(), member, 1)))

    async def _sync(self) -> None:
        """Renew every lease and registration of this instance, purge the expired ones in
        Redis, admit queued waiters, and reconcile: a grant whose wake-up was lost is
        delivered here, a waiter whose registration expired fails."""
        members = [m for m in self._held if m not in self._lost] + list(self._waiters)
        reply = await self._guard(self._renew_script(self._keys, (*self._argv(), *members)))
        self._note(reply[0])
        for member, state in zip(members, reply[1:], strict=True):
            if member in self._waiters:
                if state == 1:
                    self._resolve(member, True)
                elif state == -1:
                    self._resolve(
                        member,
                        ResourceError(
                            f"{self._name()} {self._key!r}: the waiter's place in the queue "
                            f"expired (no renewal reached Redis for {self._lease:g} s)"
                        ),
                    )
            elif state == -1 and member in self._held:
                self._lost.add(member)

    # -- background tasks -------------------------------------------------------------------

    def _ensure_renewer(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    def _ensure_listener(self) -> None:
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _renew(self) -> None:
        """Every ``lease / 3`` s while anything is held or queued: one renewal round trip."""
        me = asyncio.current_task()
        try:
            while self._held or self._waiters:
                await asyncio.sleep(self._lease / 3)
                if not (self._held or self._waiters):
                    break
                try:
                    await self._sync()
                except ResourceError:
                    # Redis unreachable: try again next round. A lease that runs out meanwhile
                    # is reported by release(); waiters hear of it from the listener.
                    continue
        finally:
            if self._renewer is me:
                self._renewer = None

    async def _listen(self) -> None:
        """Pop the ids granted to this instance's waiters from its wake-up list.

        Blocks in BLPOP until a grant arrives, or until the earliest lease in Redis runs out
        (a holder that stopped renewing: crashed or partitioned), then runs one renewal
        round trip, which purges it and admits the head of the queue. This safety re-check
        is the only time the listener reads Redis state unprompted: at the earliest lease
        expiry Redis reported, so about once per ``2/3 lease`` while waiting (live holders
        keep renewing). One BLPOP blocks at most ``MAX_BLOCK`` s and 80 % of the client's
        socket timeout; one that ends empty before the re-check time is simply issued again.
        """
        me = asyncio.current_task()
        try:
            loop = asyncio.get_running_loop()
            while self._waiters:
                block = min(self._max_block, self._recheck_at - loop.time())
                block = max(MIN_BLOCK, block)
                try:
                    reply = await self._guard(
                        self._redis.blpop([self._wake_key], timeout=block), extra=block
                    )
                    if reply is None:
                        if loop.time() >= self._recheck_at:
                            await self._sync()  # the safety re-check
                        continue
                except ResourceError as exc:
                    for member in list(self._waiters):
                        self._resolve(member, _copy(exc))
                    return
                self._resolve(_text(reply[1]), True)
        finally:
            if self._listener is me:
                self._listener = None

    def _decorate(
        self, func: Callable[P, Coroutine[Any, Any, T]], /
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        return hold_while_running(self, func)
