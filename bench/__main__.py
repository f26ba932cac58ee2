"""``python -m bench``: run every benchmark, print the table of ratios, write JSON and a chart.

Run it from the project's root (where ``bench/`` is), in an environment with the ``bench``
extra and the compiled core built in place: ``pip install -e '.[bench]' && python -m bench
--quick``. (From the root, ``import mtaio`` finds the checkout before any installed copy, so
a non-editable install leaves the compiled rows "not available".)

The exit status is 0 whatever the figures (benchmarks never assert on time), 1 if a case
raised: a broken harness or component, not a slow one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.accuracy import AccuracyResult, all_accuracy_cases
from bench.cases import CLOCKS, all_cases, use_clock
from bench.report import (
    accuracy_table,
    compute_ratios,
    environment,
    environment_text,
    ratio_table,
    times_table,
    write_chart,
    write_json,
)
from bench.runner import Measured, available_loops, run_accuracy, run_interleaved

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("micro", "contended", "accuracy")

# (rounds, ms per round, contended rounds, seconds per accuracy case)
PRESETS = {"full": (41, 8.0, 11, 0.4), "quick": (15, 4.0, 5, 0.2)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="mtaio beside its peers: per-operation ratios, contended throughput and "
        "rate accuracy, on asyncio and uvloop, for the compiled and the pure-Python core.",
    )
    parser.add_argument("--quick", action="store_true", help="a run of about a minute")
    parser.add_argument("--rounds", type=int, help="rounds of the per-operation cases")
    parser.add_argument(
        "--round-ms", type=float, help="target duration of one case in one round (ms)"
    )
    parser.add_argument("--contended-rounds", type=int, help="rounds of the contended cases")
    parser.add_argument(
        "--duration", type=float, help="seconds of real time per rate-accuracy case"
    )
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run only this section (repeatable); default: all",
    )
    parser.add_argument(
        "--loop",
        action="append",
        choices=tuple(available_loops()),
        help="run only on this event loop (repeatable); default: all available",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help=f"results directory (default {RESULTS})"
    )
    parser.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="cpu",
        help="time rounds by the thread's CPU time (default: robust on a shared machine) "
        "or by wall time",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the round shuffling")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rounds, round_ms, contended_rounds, duration = PRESETS["quick" if args.quick else "full"]
    rounds = args.rounds or rounds
    round_ms = args.round_ms or round_ms
    contended_rounds = args.contended_rounds or contended_rounds
    duration = args.duration or duration
    sections = tuple(args.only or SECTIONS)
    loops = {k: v for k, v in available_loops().items() if not args.loop or k in args.loop}
    loop_names = tuple(loops)

    use_clock(args.clock)
    env = environment()
    print(environment_text(env), flush=True)
    settings = {
        "quick": args.quick,
        "sections": sections,
        "loops": loop_names,
        "rounds": rounds,
        "round_ms": round_ms,
        "contended_rounds": contended_rounds,
        "accuracy_seconds_per_case": duration,
        "seed": args.seed,
        "clock": args.clock,
    }
    began = time.perf_counter()

    cases = all_cases()
    measured: list[Measured] = []
    accuracy: list[AccuracyResult] = []
    accuracy_errors: dict[str, str] = {}
    section_seconds: dict[str, float] = {}
    for section in sections:
        start = time.perf_counter()
        if section == "micro":
            micro = [c for c in cases if c.group != "contended"]
            print(f"per-operation cases: {len(micro)} x {len(loops)} loops, {rounds} rounds")
            measured += run_interleaved(micro, loops, rounds, round_ms, seed=args.seed)
        elif section == "contended":
            contended = [c for c in cases if c.group == "contended"]
            print(f"contended: {len(contended)} x {len(loops)} loops, {contended_rounds} rounds")
            measured += run_interleaved(
                contended, loops, contended_rounds, round_ms, seed=args.seed, collect=True
            )
        else:
            acc_cases = all_accuracy_cases()
            print(f"rate accuracy: {len(acc_cases)} x {len(loops)} loops, {duration} s each")
            accuracy, accuracy_errors = run_accuracy(acc_cases, loops, duration)
        section_seconds[section] = round(time.perf_counter() - start, 1)
    settings["section_seconds"] = section_seconds
    settings["elapsed_seconds"] = round(time.perf_counter() - began, 1)
    if hasattr(os, "getloadavg"):
        settings["load_average_at_end"] = list(os.getloadavg())

    ratios = compute_ratios(measured, loop_names)
    print()
    if measured:
        print(ratio_table(ratios, loop_names))
        print()
        print(times_table(measured, loop_names))
        print()
    if accuracy or accuracy_errors:
        print(accuracy_table(accuracy, loop_names))
        not_run: dict[str, int] = {}
        for error in accuracy_errors.values():
            not_run[error] = not_run.get(error, 0) + 1
        for error, count in not_run.items():
            print(f"  not run ({count} cases): {error}")
        print()

    args.output.mkdir(parents=True, exist_ok=True)
    json_path = args.output / "benchmark.json"
    write_json(json_path, env, settings, measured, ratios, accuracy, accuracy_errors)
    print(f"raw results: {json_path}")
    if measured and not args.no_chart:
        chart_path = args.output / "benchmark.png"
        write_chart(chart_path, measured, loop_names, env)
        print(f"chart:       {chart_path}")
    load = settings.get("load_average_at_end")
    load_text = f" (load average at the end: {load[0]:.2f})" if isinstance(load, list) else ""
    print(f"took {settings['elapsed_seconds']} s{load_text}")
    failed = [f"{m.loop}/{m.case.key}: {m.error}" for m in measured if _failed(m.error)]
    failed += [f"{key}: {error}" for key, error in accuracy_errors.items() if _failed(error)]
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


def _failed(error: str | None) -> bool:
    return error is not None and error.startswith("failed:")


if __name__ == "__main__":
    sys.exit(main())
