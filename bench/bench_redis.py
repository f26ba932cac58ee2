"""``python -m bench.bench_redis``: the Redis-backed limiters beside the round trip they cost.

Every call of ``RedisRateLimiter`` / ``RedisConcurrencyLimiter`` is one Lua script on the
server, so the floor is a bare ``EVALSHA`` through the same ``redis.asyncio`` client: of the
very same script (what mtaio adds is the difference), and of ``return 1`` (the round trip
alone). Peers with a Redis backend: ``limits`` (its async storage on redis-py) and
``throttled-py``; for the concurrency limiter, redis-py's own ``Lock``.

All cases run sequentially through one connection each, on asyncio, against a local
``redis-server`` (started here on a free loopback port, persistence off, unless ``--port``
names one). Rounds interleave the cases in a shuffled order; the table shows the median
microseconds per operation and the median of the per-round ratios to the floor, so that a
busy machine slows numerator and denominator alike. Needs ``pip install 'mtaio[redis]'
limits throttled-py``; a peer that is not installed is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.lock import Lock

from mtaio.resources import _redis_scripts as scripts
from mtaio.resources.redis import RedisConcurrencyLimiter, RedisRateLimiter

Op = Callable[[], Awaitable[Any]]
#: So fast that the bucket never runs dry: the uncontended path, one round trip per call.
FAST_RATE = 1e9


@dataclass
class Case:
    group: str  # "rate" or "concurrency"
    label: str
    op: Op
    floor: bool = False  # the denominator of its group's ratios


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_server(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (Debian: apt-get install redis-server)")
    port = _free_port()
    options = {"port": str(port), "bind": "127.0.0.1", "save": "", "appendonly": "no"}
    options.update(dir=str(directory), logfile=str(directory / "redis.log"))
    argv = [binary]
    for name, value in options.items():
        argv += [f"--{name}", value]
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("redis-server did not start")
        time.sleep(0.01)


def _key(name: str) -> str:
    return f"bench:{name}:{uuid.uuid4().hex[:8]}"


async def _cases(port: int) -> tuple[list[Case], list[str], list[Redis]]:
    cases: list[Case] = []
    skipped: list[str] = []
    clients: list[Redis] = []

    def client() -> Redis:
        redis = Redis(host="127.0.0.1", port=port)
        clients.append(redis)
        return redis

    # -- rate: floors and mtaio -----------------------------------------------------------
    redis = client()
    trivial = redis.register_script("return 1")
    trivial_keys = (_key("trivial"),)
    cases.append(Case("rate", "EVALSHA 'return 1' (round trip)", lambda: trivial(trivial_keys, ())))
    limiter = RedisRateLimiter(client(), _key("mtaio"), FAST_RATE)
    gcra = redis.register_script(scripts.RATE_ACQUIRE)
    gcra_keys = (_key("gcra"),)
    gcra_args = (1e6 / FAST_RATE, limiter._tau_us, -1.0)
    cases.append(
        Case("rate", "EVALSHA of mtaio's GCRA script", lambda: gcra(gcra_keys, gcra_args), True)
    )
    cases.append(Case("rate", "mtaio RedisRateLimiter.acquire()", limiter.acquire))
    unwatched = RedisRateLimiter(client(), _key("unwatched"), FAST_RATE, command_timeout=None)
    cases.append(Case("rate", "  the same, command_timeout=None", unwatched.acquire))
    cases.append(Case("rate", "mtaio RedisRateLimiter.try_acquire()", limiter.try_acquire))

    # -- rate: peers ----------------------------------------------------------------------
    try:
        from limits import RateLimitItemPerSecond
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import (
            FixedWindowRateLimiter,
            MovingWindowRateLimiter,
            SlidingWindowCounterRateLimiter,
        )
    except ImportError as exc:
        skipped.append(f"limits: {exc}")
    else:
        storage = RedisStorage(f"async+redis://127.0.0.1:{port}", implementation="redispy")
        item = RateLimitItemPerSecond(10**6)
        for strategy in (
            FixedWindowRateLimiter,
            SlidingWindowCounterRateLimiter,
            MovingWindowRateLimiter,
        ):
            peer = strategy(storage)
            name = _key(strategy.__name__)

            def hit(peer: Any = peer, name: str = name) -> Awaitable[bool]:
                result: Awaitable[bool] = peer.hit(item, name)
                return result

            cases.append(Case("rate", f"limits {strategy.__name__}.hit()", hit))
    try:
        from throttled.asyncio import RedisStore, Throttled, per_sec
    except ImportError as exc:
        skipped.append(f"throttled-py: {exc}")
    else:
        store = RedisStore(server=f"redis://127.0.0.1:{port}/0")
        for using in ("gcra", "token_bucket"):
            throttle = Throttled(
                key=_key(using),
                using=using,
                quota=per_sec(10**9, burst=10**9),
                store=store,
                timeout=-1,
            )
            cases.append(Case("rate", f"throttled-py {using} limit()", throttle.limit))

    # -- concurrency ----------------------------------------------------------------------
    permits = RedisConcurrencyLimiter(client(), _key("permits"), 1_000_000)
    take = redis.register_script(scripts.CONCURRENCY_ACQUIRE)
    give = redis.register_script(scripts.CONCURRENCY_RELEASE)
    tag = "{" + _key("pair") + "}"
    pair_keys = (f"{tag}:holders", f"{tag}:queue", f"{tag}:alive", f"{tag}:sequence")
    pair_argv = (1_000_000, 30_000, f"{tag}:wake:")

    async def pair() -> None:
        await take(pair_keys, (*pair_argv, "bench:1", 1, -1))
        await give(pair_keys, (*pair_argv, "bench:1"))

    cases.append(Case("concurrency", "2 x EVALSHA (acquire + release scripts)", pair, True))

    async def hold() -> None:
        async with permits:
            pass

    cases.append(Case("concurrency", "mtaio RedisConcurrencyLimiter async with", hold))
    lock = Lock(client(), _key("lock"), timeout=30)

    async def locked() -> None:
        await lock.acquire()
        await lock.release()

    cases.append(Case("concurrency", "redis-py Lock acquire + release", locked))
    return cases, skipped, clients


async def _time(op: Op, ops: int) -> float:
    """Microseconds per operation for ``ops`` calls back to back in this task."""
    start = time.perf_counter_ns()
    for _ in range(ops):
        await op()
    return (time.perf_counter_ns() - start) / ops / 1000


async def _run(port: int, rounds: int, ops: int, seed: int) -> None:
    cases, skipped, clients = await _cases(port)
    for case in cases:  # warm-up: connections made, scripts loaded
        await _time(case.op, 20)
    per_op: dict[str, list[float]] = {case.label: [] for case in cases}
    ratios: dict[str, list[float]] = {case.label: [] for case in cases}
    shuffle = random.Random(seed)
    for _ in range(rounds):
        order = cases[:]
        shuffle.shuffle(order)
        measured = {case.label: await _time(case.op, ops) for case in order}
        for case in cases:
            floor = next(c for c in cases if c.group == case.group and c.floor)
            per_op[case.label].append(measured[case.label])
            ratios[case.label].append(measured[case.label] / measured[floor.label])
    for redis in clients:
        await redis.aclose()

    print(f"{rounds} rounds x {ops} operations per case, one connection each, asyncio")
    for group in ("rate", "concurrency"):
        print(f"\n{group:<46} {'us/op':>8} {'x floor':>8}")
        for case in cases:
            if case.group == group:
                mark = " (floor)" if case.floor else ""
                print(
                    f"{case.label + mark:<46} {statistics.median(per_op[case.label]):8.1f} "
                    f"{statistics.median(ratios[case.label]):8.3f}"
                )
    for reason in skipped:
        print(f"skipped: {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_redis", description=__doc__)
    parser.add_argument("--port", type=int, help="use the redis-server on 127.0.0.1:PORT")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--ops", type=int, default=200, help="operations per case per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.port is not None:
        asyncio.run(_run(args.port, args.rounds, args.ops, args.seed))
        return 0
    with tempfile.TemporaryDirectory() as directory:
        process, port = _start_server(Path(directory))
        try:
            asyncio.run(_run(port, args.rounds, args.ops, args.seed))
        finally:
            process.terminate()
            process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
