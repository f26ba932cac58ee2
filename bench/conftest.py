"""pytest-benchmark harness for ``pytest bench/ --benchmark-only`` (never the default run).

- ``bench_loop``: each benchmark runs once per event loop (ids ``asyncio`` / ``uvloop``); the
  loop is a plain one made here, so the project's virtual clock (looptime) never touches it.
- ``run_case``: times one :class:`bench.cases.Case` with ``benchmark.pedantic``. One round is
  1,000 operations inside one coroutine (10,000 tasks for the contended cases), so in
  pytest-benchmark's own table, which shows time **per round**, a round's microseconds are
  nanoseconds per operation (and a contended round's milliseconds / 10 are microseconds per
  task). ``extra_info`` holds
  ``ops_per_round`` and ``ns_per_op_median``, measured inside the coroutine (without the cost
  of entering the loop). A case that cannot run here (an mtaio class not written yet, the
  compiled core not built) is skipped with the reason.

Benchmarks record numbers; they never assert on them. ``python -m bench`` runs the same cases
interleaved and prints the ratios.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from statistics import median

import pytest

from bench.cases import GROUPS, Case, NotAvailable, Timed
from bench.runner import LOOPS, available_loops
from bench.suite import BenchLoop, Benchmark

OPS_PER_ROUND = 1_000
ROUNDS = 50
FIXED_ROUNDS = 5  # for the contended cases: one round is 10,000 tasks


@pytest.fixture(params=LOOPS)
def bench_loop(request: pytest.FixtureRequest) -> Iterator[BenchLoop]:
    name: str = request.param
    loop = available_loops()[name]()
    try:
        yield name, loop
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _prepare(case: Case) -> Timed:
    return case.prepare()


@pytest.fixture
def run_case(benchmark: Benchmark, bench_loop: BenchLoop) -> Callable[[Case], None]:
    loop_name, loop = bench_loop

    def run(case: Case) -> None:
        try:
            timed = loop.run_until_complete(_prepare(case))
        except NotAvailable as exc:
            pytest.skip(f"not available: {exc}")
        if case.ops is not None:
            ops, rounds = case.ops, FIXED_ROUNDS
        else:
            ops, rounds = OPS_PER_ROUND, ROUNDS
        per_op_ns: list[float] = []

        def one_round() -> None:
            per_op_ns.append(loop.run_until_complete(timed(ops)) / ops)

        benchmark.group = f"{GROUPS[case.group]} [{loop_name}]"
        benchmark.extra_info.update(label=case.label, loop=loop_name, ops_per_round=ops)
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1)
        benchmark.extra_info["ns_per_op_median"] = median(per_op_ns)

    return run
