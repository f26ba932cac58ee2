"""Rate accuracy in real time (see ``bench/accuracy.py``): recorded, never asserted.

Each case runs once for ``DURATION`` seconds; ``extra_info`` holds the achieved / configured
rate, the worst 10 ms window against SPEC §2's bound, and the CPU time per granted token.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from bench.accuracy import (
    AccuracyCase,
    AccuracyResult,
    all_accuracy_cases,
    check_available,
    measure,
)
from bench.cases import NotAvailable
from bench.suite import BenchLoop, Benchmark

DURATION = 0.3


@pytest.mark.parametrize("case", all_accuracy_cases(), ids=lambda case: case.key)
def test_rate_accuracy(benchmark: Benchmark, bench_loop: BenchLoop, case: AccuracyCase) -> None:
    loop_name, loop = bench_loop
    try:
        check_available(case)
    except NotAvailable as exc:
        pytest.skip(f"not available: {exc}")

    def run() -> AccuracyResult:
        return loop.run_until_complete(measure(case, DURATION, loop_name))

    benchmark.group = f"rate accuracy [{loop_name}]"
    result = benchmark.pedantic(run, rounds=1)
    benchmark.extra_info.update(asdict(result), window_ratio=result.window_ratio)
