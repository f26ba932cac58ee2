"""Interleaved timing: every case runs once per round, in a shuffled order, on each loop.

A ratio compares two cases measured in the same rounds, so a slow patch on a shared machine
hits numerator and denominator alike; the ratio reported is the median over rounds of the
per-round ratio. Each loop (asyncio, uvloop) lives for the whole run, and each case's objects
are made once per loop, inside it.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import median
from types import ModuleType

from bench.accuracy import AccuracyCase, AccuracyResult, measure
from bench.cases import Case, NotAvailable, Timed

__all__ = ["LOOPS", "Measured", "available_loops", "run_accuracy", "run_interleaved"]

uvloop: ModuleType | None
try:
    import uvloop
except ImportError:  # Windows, PyPy, free-threaded builds
    uvloop = None

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def available_loops() -> dict[str, LoopFactory]:
    loops: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    if uvloop is not None:
        loops["uvloop"] = uvloop.new_event_loop
    return loops


LOOPS = tuple(available_loops())

MIN_OPS = 100
MAX_OPS = 200_000


@dataclass
class Measured:
    """One case on one loop: per-operation nanoseconds, one figure per round."""

    case: Case
    loop: str
    ops: int = 0
    per_op_ns: list[float] = field(default_factory=list)
    error: str | None = None  # why it did not run ("not available: ...", "failed: ...")

    @property
    def median_ns(self) -> float | None:
        return median(self.per_op_ns) if self.per_op_ns and self.error is None else None


def _progress(text: str) -> None:
    sys.stdout.flush()
    print(text, end="", file=sys.stderr, flush=True)


async def _prepare(case: Case) -> Timed:
    return case.prepare()


def _start(loop: asyncio.AbstractEventLoop, measured: Measured, round_ns: float) -> Timed | None:
    """Make the case's objects, warm it up and choose its operations per round."""
    case = measured.case
    try:
        timed = loop.run_until_complete(_prepare(case))
        if case.ops is not None:
            measured.ops = case.ops
        else:
            elapsed = loop.run_until_complete(timed(MIN_OPS))
            per_op = max(elapsed / MIN_OPS, 1.0)
            measured.ops = int(min(MAX_OPS, max(MIN_OPS, round_ns / per_op)))
        loop.run_until_complete(timed(measured.ops))  # warm-up at full size
    except NotAvailable as exc:
        measured.error = f"not available: {exc}"
        return None
    except Exception as exc:  # a component in progress must not stop the run
        measured.error = f"failed: {type(exc).__name__}: {exc}"
        return None
    return timed


def run_interleaved(
    cases: Sequence[Case],
    loops: dict[str, LoopFactory],
    rounds: int,
    round_ms: float,
    seed: int = 0,
    collect: bool = False,
) -> list[Measured]:
    """Time ``cases`` on every loop for ``rounds`` rounds, interleaved; return all results.

    Cases without a fixed ``ops`` are calibrated to about ``round_ms`` per round. With
    ``collect``, a full garbage collection precedes every timed round (for cases that make
    thousands of objects, whose time otherwise depends on when the collector last ran).
    """
    shuffle = random.Random(seed).shuffle
    results: list[Measured] = []
    running: dict[str, tuple[asyncio.AbstractEventLoop, list[tuple[Measured, Timed]]]] = {}
    try:
        for loop_name, factory in loops.items():
            loop = factory()
            live: list[tuple[Measured, Timed]] = []
            running[loop_name] = (loop, live)
            for case in cases:
                measured = Measured(case, loop_name)
                results.append(measured)
                timed = _start(loop, measured, round_ms * 1e6)
                if timed is not None:
                    live.append((measured, timed))
        for _ in range(rounds):
            for loop, live in running.values():
                order = list(live)
                shuffle(order)
                for measured, timed in order:
                    if measured.error is not None:
                        continue
                    if collect:
                        gc.collect()  # every round of a big case starts from the same heap
                    try:
                        elapsed = loop.run_until_complete(timed(measured.ops))
                    except Exception as exc:
                        measured.error = f"failed: {type(exc).__name__}: {exc}"
                        continue
                    measured.per_op_ns.append(elapsed / measured.ops)
            _progress(".")
    finally:
        for loop, _ in running.values():
            _close(loop)
        _progress("\n")
    return results


def _close(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def run_accuracy(
    cases: Sequence[AccuracyCase],
    loops: dict[str, LoopFactory],
    duration: float,
) -> tuple[list[AccuracyResult], dict[str, str]]:
    """Run every accuracy case on every loop; also return the cases that could not run."""
    results: list[AccuracyResult] = []
    errors: dict[str, str] = {}
    for loop_name, factory in loops.items():
        loop = factory()
        try:
            for case in cases:
                try:
                    results.append(loop.run_until_complete(measure(case, duration, loop_name)))
                except NotAvailable as exc:
                    errors[f"{loop_name}/{case.key}"] = f"not available: {exc}"
                except Exception as exc:
                    errors[f"{loop_name}/{case.key}"] = f"failed: {type(exc).__name__}: {exc}"
                _progress(".")
        finally:
            _close(loop)
    _progress("\n")
    return results, errors
