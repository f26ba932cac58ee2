"""A private ``redis-server`` for the Redis tests, their fixtures, and the worker processes.

- :class:`RedisServer` runs ``redis-server`` on a free loopback port (127.0.0.1 only), in a
  temporary directory, with persistence off. It can be stopped and started again on the same
  port (the restart test).
- Fixtures (import ``redis_server_fixture`` and ``client_fixture`` into a test module):
  ``redis_server`` (one server per module) and ``client`` (a ``redis.asyncio.Redis`` on it,
  closed after the test; no client-side retries, so a dead server fails at once). Tests
  skip with the reason shown when the ``redis-server`` binary is not on PATH or the
  ``redis`` package is missing.
- ``rate_worker`` / ``concurrency_worker`` / ``holder_worker`` run in separate processes
  (``multiprocessing``, spawn) and log their grants with ``time.monotonic()``, one clock
  for every process on the host.
"""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import pytest

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "REDIS_SERVER",
    "RedisServer",
    "SilentServer",
    "client_fixture",
    "concurrency_storm_worker",
    "concurrency_worker",
    "connect",
    "holder_worker",
    "most_at_once",
    "most_in_window",
    "rate_storm_worker",
    "rate_worker",
    "redis_server_fixture",
    "report",
    "run_in_processes",
    "within",
]

T = TypeVar("T")

REDIS_SERVER = shutil.which("redis-server")
# Set by .ci/run: there a missing server or client is a failure, not a skip.
REQUIRE_REDIS = os.environ.get("MTAIO_REQUIRE_REDIS", "") not in ("", "0")


def _unavailable(reason: str) -> NoReturn:
    if REQUIRE_REDIS:
        pytest.fail(f"{reason}, and MTAIO_REQUIRE_REDIS=1")
    pytest.skip(reason)


def _require_server() -> None:
    if REDIS_SERVER is None:
        _unavailable("redis-server is not on PATH (Debian: apt-get install redis-server)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process: loopback only, no persistence, its own directory."""

    def __init__(self, directory: Path) -> None:
        _require_server()
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert REDIS_SERVER is not None
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "protected-mode": "yes",
            "save": "",  # persistence off: a restart starts empty
            "appendonly": "no",
            "dir": str(self.directory),
            "logfile": str(self.directory / "redis.log"),
            "daemonize": "no",
        }
        argv = [REDIS_SERVER]
        for name, value in options.items():
            argv += [f"--{name}", value]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10.0
        while not self._answers():  # startup only: a few ms
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.005)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class SilentServer:
    """``async with SilentServer() as port``: a TCP server on 127.0.0.1 that accepts
    connections and never answers, i.e. a hung Redis."""

    def __init__(self) -> None:
        self.accepted: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted.append(writer)

        self.server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.accepted:
            writer.close()
        for writer in self.accepted:
            await writer.wait_closed()
        await self.server.wait_closed()


def within(awaitable: Awaitable[T], seconds: float = 10.0) -> Awaitable[T]:
    """Await in a test with a bound: a bug fails the test instead of hanging it."""
    return asyncio.wait_for(awaitable, seconds)


def connect(port: int, **options: Any) -> Redis:
    """A client of the test server: short socket timeouts, no client-side retries."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    settings: dict[str, Any] = {
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
        "retry": Retry(NoBackoff(), 0),
    }
    settings.update(options)
    return Redis(host="127.0.0.1", port=port, **settings)


@pytest.fixture(scope="module", name="redis_server")
def redis_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if importlib.util.find_spec("redis") is None:
        _unavailable("the redis package is not installed (mtaio[redis])")
    _require_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="client")
async def client_fixture(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = connect(redis_server.port)
    try:
        yield redis
    finally:
        await redis.aclose()


# -- worker processes -------------------------------------------------------------------------


def run_in_processes(count: int, worker: Callable[..., T], *args: Any) -> list[T]:
    """Run ``worker(*args, start)`` in ``count`` fresh (spawned) processes; ``start`` is a
    barrier they pass together. Returns their results; fails if any worker failed."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(count)
    results: Queue[Any] = context.Queue()
    processes = [
        context.Process(target=report, args=(results, worker, *args, start)) for _ in range(count)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=120) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    failures = [detail for ok, detail in outcomes if not ok]
    assert not failures, failures
    return [detail for _, detail in outcomes]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of overlapping ``(enter, exit)`` intervals (a tie counts as an
    overlap: entries sort before exits at the same instant)."""
    events = sorted(
        [(enter, 1) for enter, _ in intervals] + [(leave, -1) for _, leave in intervals],
        key=lambda event: (event[0], -event[1]),
    )
    inside = most = 0
    for _, change in events:
        inside += change
        most = max(most, inside)
    return most


def most_in_window(times: list[float], window: float) -> int:
    """The largest number of entries of sorted ``times`` within any closed window."""
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] > window:
            first += 1
        most = max(most, last - first + 1)
    return most


def report(results: Queue[Any], worker: Callable[..., Any], *args: Any) -> None:
    """Process target: run ``worker(*args)`` and put its result (or its error) on ``results``."""
    try:
        results.put((True, worker(*args)))
    except BaseException as exc:
        results.put((False, f"{type(exc).__name__}: {exc}"))
        raise


def rate_worker(
    port: int, key: str, rate: float, burst: float, tasks: int, seconds: float, start: Barrier
) -> list[tuple[float, float]]:
    """Acquire one token at a time from ``tasks`` tasks for ``seconds``.

    Returns ``(monotonic time acquire() returned, server time of the reserved slot)`` per
    grant.
    """
    from mtaio.resources.redis import RedisRateLimiter

    async def main() -> list[tuple[float, float]]:
        redis = connect(port)
        limiter = RedisRateLimiter(redis, key, rate, burst)
        log: list[tuple[float, float]] = []
        await redis.ping()  # connected before the clock starts
        start.wait()
        stop = time.monotonic() + seconds

        async def run() -> None:
            while time.monotonic() < stop:
                slot = await limiter._take(1.0, None, dated=True)
                assert slot is not None
                log.append((time.monotonic(), slot))

        await asyncio.gather(*(run() for _ in range(tasks)))
        await limiter.aclose()
        await redis.aclose()
        return log

    return asyncio.run(main())


def concurrency_worker(
    port: int, key: str, limit: int, tasks: int, seconds: float, start: Barrier
) -> list[tuple[float, float]]:
    """Hold a permit for 1-6 ms at a time from ``tasks`` tasks for ``seconds``.

    Returns ``(monotonic entry, monotonic exit)`` per holding: entry after ``acquire()``
    returned, exit before the release starts, so each interval lies inside the time Redis
    counted the permit as held.
    """
    from mtaio.resources.redis import RedisConcurrencyLimiter

    async def main() -> list[tuple[float, float]]:
        # The default pool: a task may have a call in flight while a cancelled call of its own
        # still gives its place back in the background, so one connection per task is too few.
        redis = connect(port)
        limiter = RedisConcurrencyLimiter(redis, key, limit, lease=5.0)
        log: list[tuple[float, float]] = []
        rng = random.Random(os.getpid())
        await redis.ping()
        start.wait()
        stop = time.monotonic() + seconds

        async def run() -> None:
            while time.monotonic() < stop:
                async with limiter:
                    entered = time.monotonic()
                    await asyncio.sleep(rng.uniform(0.001, 0.006))
                    log.append((entered, time.monotonic()))

        await asyncio.gather(*(run() for _ in range(tasks)))
        await limiter.aclose()
        await redis.aclose()
        return log

    return asyncio.run(main())


def holder_worker(port: int, key: str, lease: float, holding: Event) -> None:
    """Take the only permit, say so, and hold it until killed."""
    from mtaio.resources.redis import RedisConcurrencyLimiter

    async def main() -> None:
        redis = connect(port)
        limiter = RedisConcurrencyLimiter(redis, key, 1, lease=lease)
        await limiter.acquire()
        holding.set()
        await asyncio.sleep(3600)

    asyncio.run(main())


def rate_storm_worker(
    port: int, key: str, rate: float, burst: float, tasks: int, seconds: float, start: Barrier
) -> list[tuple[float, float]]:
    """Like ``rate_worker``, but about a third of the requests are cancelled at a random
    moment (during the round trip, while sleeping on the reservation, or just after it).

    Returns ``(monotonic return, server slot)`` of the requests that completed.
    """
    from mtaio.resources.redis import RedisRateLimiter

    async def main() -> list[tuple[float, float]]:
        redis = connect(port)
        limiter = RedisRateLimiter(redis, key, rate, burst)
        log: list[tuple[float, float]] = []
        rng = random.Random(os.getpid())
        await redis.ping()
        start.wait()
        stop = time.monotonic() + seconds

        async def take() -> None:
            slot = await limiter._take(1.0, None, dated=True)
            assert slot is not None
            log.append((time.monotonic(), slot))

        async def run() -> None:
            while time.monotonic() < stop:
                request = asyncio.ensure_future(take())
                if rng.random() < 0.35:
                    await asyncio.sleep(rng.uniform(0.0, 0.02))
                    request.cancel()
                await asyncio.gather(request, return_exceptions=True)

        await asyncio.gather(*(run() for _ in range(tasks)))
        await limiter.aclose()
        await redis.aclose()
        return log

    return asyncio.run(main())


def concurrency_storm_worker(
    port: int, key: str, limit: int, tasks: int, seconds: float, start: Barrier
) -> tuple[list[tuple[float, float]], int]:
    """Hold, time out, give up, cancel and try at random from ``tasks`` tasks.

    Returns the holder intervals (as ``concurrency_worker``) and how many requests ended
    without a permit.
    """
    from mtaio.exceptions import ResourceLimitError
    from mtaio.resources.redis import RedisConcurrencyLimiter

    async def main() -> tuple[list[tuple[float, float]], int]:
        # The default pool: a task may have a call in flight while a cancelled call of its own
        # still gives its place back in the background, so one connection per task is too few.
        redis = connect(port)
        limiter = RedisConcurrencyLimiter(redis, key, limit, lease=2.0)
        log: list[tuple[float, float]] = []
        refused = 0
        rng = random.Random(os.getpid())
        await redis.ping()
        start.wait()
        stop = time.monotonic() + seconds

        async def hold() -> None:
            async with limiter:
                entered = time.monotonic()
                await asyncio.sleep(rng.uniform(0.0, 0.01))
                log.append((entered, time.monotonic()))

        async def run() -> None:
            nonlocal refused
            while time.monotonic() < stop:
                choice = rng.random()
                try:
                    if choice < 0.5:
                        await hold()
                    elif choice < 0.7:
                        await asyncio.wait_for(hold(), rng.uniform(0.0, 0.02))  # cancels
                    elif choice < 0.9:
                        await limiter.acquire(timeout=rng.uniform(0.0, 0.02))
                        entered = time.monotonic()
                        log.append((entered, time.monotonic()))
                        await limiter.release()
                    elif await limiter.try_acquire():
                        entered = time.monotonic()
                        log.append((entered, time.monotonic()))
                        await limiter.release()
                    else:
                        refused += 1
                except (ResourceLimitError, TimeoutError):
                    refused += 1

        await asyncio.gather(*(run() for _ in range(tasks)))
        await limiter.aclose()
        await redis.aclose()
        return log, refused

    return asyncio.run(main())
