"""What a run prints and writes: the ratio table, per-operation times, accuracy, JSON, chart.

Every ratio is ``numerator / denominator`` of per-operation time on the same loop, in the same
process: the median over rounds of the ratio within each round (numerator and denominator ran
interleaved in every round). Lower is faster; a target ``<= x`` is met when the ratio is at
most ``x`` on every loop.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from statistics import median, quantiles
from typing import Any

import mtaio
from bench.accuracy import LIMITERS, AccuracyResult
from bench.cases import GROUPS, KINDS, NotAvailable, mtaio_class
from bench.runner import Measured
from mtaio._core import _TWINS, IMPLEMENTATION

__all__ = [
    "RATIOS",
    "Ratio",
    "RatioResult",
    "accuracy_table",
    "compute_ratios",
    "environment",
    "environment_text",
    "ratio_table",
    "times_table",
    "write_chart",
    "write_json",
]

PACKAGES = (
    "uvloop",
    "aiolimiter",
    "anyio",
    "async-timeout",
    "pytest-benchmark",
    "matplotlib",
)


@dataclass(frozen=True)
class Ratio:
    """A row of the table: ``numerator / denominator`` (case keys), and the issue's target."""

    section: str
    label: str
    numerator: str
    denominator: str
    target: float | None = None  # met when the ratio is <= target
    headline: bool = False  # quoted in the README


def _ratios() -> list[Ratio]:
    rows: list[Ratio] = []

    def row(
        section: str,
        label: str,
        numerator: str,
        denominator: str,
        target: float | None = None,
        headline: bool = False,
    ) -> None:
        rows.append(Ratio(section, label, numerator, denominator, target, headline))

    s = "RateLimiter"
    row(s, "async with / floor", "async-with/rate-cython", "async-with/floor", 0.8, True)
    row(s, "acquire() / floor", "acquire/rate-cython", "async-with/floor", 0.5)
    row(s, "@limit call / wrapped floor", "decorator/rate-cython", "decorator/wrapped-floor", 1.0)
    row(
        s,
        "async with / aiolimiter async with",
        "async-with/rate-cython",
        "async-with/aiolimiter",
        1 / 6,
        True,
    )
    row(s, "pure Python async with / floor", "async-with/rate-python", "async-with/floor", 2.0)
    row(s, "pure Python acquire() / floor", "acquire/rate-python", "async-with/floor")
    row(
        s,
        "pure Python @limit call / wrapped floor",
        "decorator/rate-python",
        "decorator/wrapped-floor",
    )
    row(
        s,
        "pure Python async with / aiolimiter",
        "async-with/rate-python",
        "async-with/aiolimiter",
    )

    s = "ConcurrencyLimiter"
    row(s, "async with / floor", "async-with/concurrency-cython", "async-with/floor", 0.8, True)
    row(
        s,
        "async with / asyncio.Semaphore",
        "async-with/concurrency-cython",
        "async-with/semaphore",
        1 / 3.5,
        True,
    )
    row(
        s,
        "async with / anyio CapacityLimiter",
        "async-with/concurrency-cython",
        "async-with/anyio",
    )
    row(
        s,
        "acquire+release / asyncio.Semaphore's",
        "acquire/concurrency-cython",
        "acquire/semaphore",
    )
    row(
        s,
        "@limit call / wrapped floor",
        "decorator/concurrency-cython",
        "decorator/wrapped-floor",
    )
    row(
        s,
        "pure Python async with / asyncio.Semaphore",
        "async-with/concurrency-python",
        "async-with/semaphore",
        1.0,
    )
    row(s, "pure Python async with / floor", "async-with/concurrency-python", "async-with/floor")
    row(
        s,
        "contended / asyncio.Semaphore contended",
        "contended/concurrency-cython",
        "contended/semaphore",
        1.0,
        True,
    )
    row(
        s,
        "pure Python contended / asyncio.Semaphore",
        "contended/concurrency-python",
        "contended/semaphore",
        1.0,
    )
    row(
        s,
        "contended / anyio CapacityLimiter contended",
        "contended/concurrency-cython",
        "contended/anyio",
    )
    row(
        s, "(peer) asyncio.Semaphore async with / floor", "async-with/semaphore", "async-with/floor"
    )

    s = "TimeoutManager"
    row(
        s,
        "tm.timeout(10) / asyncio.timeout(10)",
        "timeout/tm-timeout-cython",
        "timeout/asyncio-timeout",
        0.35,
        True,
    )
    row(
        s,
        "TimeoutManager(10) block / asyncio.timeout(10)",
        "timeout/tm-new-cython",
        "timeout/asyncio-timeout",
        0.35,
    )
    row(
        s,
        "shared tm block / asyncio.timeout(10)",
        "timeout/tm-shared-cython",
        "timeout/asyncio-timeout",
    )
    row(s, "tm.run / asyncio.wait_for", "run/tm-run-cython", "run/wait-for", 0.35, True)
    row(
        s,
        "tm.run / asyncio.timeout around await",
        "run/tm-run-cython",
        "run/asyncio-timeout",
    )
    row(
        s,
        "tm.timeout(10) / async_timeout.timeout(10)",
        "timeout/tm-timeout-cython",
        "timeout/async-timeout",
    )
    row(
        s,
        "pure Python tm.timeout(10) / asyncio.timeout",
        "timeout/tm-timeout-python",
        "timeout/asyncio-timeout",
        1.0,
    )
    row(
        s,
        "pure Python TimeoutManager(10) / asyncio.timeout",
        "timeout/tm-new-python",
        "timeout/asyncio-timeout",
        1.0,
    )
    row(s, "pure Python tm.run / asyncio.wait_for", "run/tm-run-python", "run/wait-for")
    return rows


RATIOS: list[Ratio] = _ratios()


@dataclass(frozen=True)
class RatioResult:
    ratio: Ratio
    per_loop: dict[str, float | None]  # median of per-round ratios; None: not measured
    of_medians: dict[str, float | None]  # ratio of the two medians, for reference
    quartiles: dict[str, tuple[float, float] | None]  # spread of the per-round ratios

    @property
    def met(self) -> bool | None:
        """Target met on every loop; ``None`` without a target or without figures."""
        values = list(self.per_loop.values())
        if self.ratio.target is None or not values or any(v is None for v in values):
            return None
        return all(v is not None and v <= self.ratio.target for v in values)


def compute_ratios(measured: Sequence[Measured], loops: Sequence[str]) -> list[RatioResult]:
    by_key = {(m.loop, m.case.key): m for m in measured}
    ran = {m.case.key for m in measured}
    out: list[RatioResult] = []
    for ratio in RATIOS:
        if ratio.numerator not in ran or ratio.denominator not in ran:
            continue  # a section left out of this run (--only)
        per_loop: dict[str, float | None] = {}
        of_medians: dict[str, float | None] = {}
        spread: dict[str, tuple[float, float] | None] = {}
        for loop in loops:
            num = by_key.get((loop, ratio.numerator))
            den = by_key.get((loop, ratio.denominator))
            if num is None or den is None or num.median_ns is None or den.median_ns is None:
                per_loop[loop] = of_medians[loop] = spread[loop] = None
                continue
            paired = [a / b for a, b in zip(num.per_op_ns, den.per_op_ns, strict=False)]
            per_loop[loop] = median(paired)
            of_medians[loop] = num.median_ns / den.median_ns
            if len(paired) >= 2:
                low, _, high = quantiles(paired, n=4)
                spread[loop] = (low, high)
            else:
                spread[loop] = None
        out.append(RatioResult(ratio, per_loop, of_medians, spread))
    return out


# ------------------------------------------------------------------------------ tables


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def ratio_table(results: Sequence[RatioResult], loops: Sequence[str]) -> str:
    if not results:
        return "(no ratio has both of its cases in this run)"
    width = max(len(r.ratio.label) for r in results) + 2
    head = f"{'ratio (lower is faster)':<{width}}" + "".join(f"{loop:>9}" for loop in loops)
    lines = [head + f"{'target':>10}  met"]
    section = ""
    for result in results:
        if result.ratio.section != section:
            section = result.ratio.section
            lines.append(f"{section}")
        target = result.ratio.target
        met = {True: "yes", False: "NO", None: ""}[result.met]
        if target is not None and result.met is None:
            met = "n/a"
        lines.append(
            f"  {result.ratio.label:<{width - 2}}"
            + "".join(f"{_fmt(result.per_loop[loop]):>9}" for loop in loops)
            + f"{'' if target is None else f'<= {target:.3g}':>10}  {met}".rstrip()
        )
    return "\n".join(lines)


def times_table(measured: Sequence[Measured], loops: Sequence[str]) -> str:
    """Median ns per operation of every case, by group (per task for the contended group)."""
    by_key = {(m.loop, m.case.key): m for m in measured}
    seen: dict[str, Measured] = {}
    for m in measured:
        seen.setdefault(m.case.key, m)
    width = max(len(m.case.label) for m in seen.values()) + 4
    lines = [f"{'ns per operation (median)':<{width}}" + "".join(f"{loop:>10}" for loop in loops)]
    notes: set[str] = set()
    for group, title in GROUPS.items():
        members = [(key, first) for key, first in seen.items() if first.case.group == group]
        if members:
            lines.append(title)
        for key, first in members:
            cells = []
            for loop in loops:
                found = by_key.get((loop, key))
                if found is not None and found.median_ns is not None:
                    cells.append(f"{found.median_ns:>10.0f}")
                else:
                    cells.append(f"{'n/a':>10}")
                    if found is not None and found.error:
                        notes.add(found.error)
            lines.append(f"  {first.case.label:<{width - 2}}" + "".join(cells))
    if notes:
        lines.append("not measured:")
        lines.extend(f"  {error}" for error in sorted(notes))
    return "\n".join(lines)


def accuracy_table(results: Sequence[AccuracyResult], loops: Sequence[str]) -> str:
    """One row per limiter, rate, burst and consumers; per loop: achieved, window, CPU."""
    cell = "{:>9}{:>8}{:>8}{:>6}{:>7}"
    lines = [
        f"{'rate accuracy':<27}{'rate/s':>8}{'burst':>8}{'tasks':>6}"
        + "".join(f"  {loop + ': achieved window CPU us  CPU% desch%':<38}" for loop in loops),
    ]
    rows: dict[tuple[str, float, float, int], dict[str, AccuracyResult]] = {}
    for r in results:
        rows.setdefault((r.limiter, r.rate, r.burst, r.consumers), {})[r.loop] = r
    for (limiter, rate, burst, consumers), per_loop in rows.items():
        line = f"{LIMITERS.get(limiter, limiter):<27}{rate:>8,.0f}{burst:>8,.0f}{consumers:>6}"
        for loop in loops:
            one = per_loop.get(loop)
            if one is None:
                line += f"  {'n/a':<38}"
                continue
            desched = one.descheduled_share
            line += "  " + cell.format(
                f"{one.achieved_ratio:.4f}",
                f"{one.window_ratio:.3f}",
                _fmt(one.cpu_us_per_token, ".2f"),
                f"{one.cpu_share * 100:.0f}",
                "n/a" if desched is None else f"{desched * 100:.0f}",
            )
            line += " " * 2
        lines.append(line.rstrip())
    lines += [
        "achieved: achieved / configured rate, middle 80 % of the run (SPEC: 0.99-1.005);",
        "window: most tokens in any 10 ms window / SPEC bound max(burst, rate*0.002) + rate*0.01",
        "(<= 1 holds; stamps lag grants by up to a loop iteration, so an excess of up to",
        "rate*1 ms tokens, 1.083 for burst 1, is within the measurement's resolution);",
        "CPU us: process CPU time per granted token; CPU%: process CPU time / wall time;",
        "desch%: time runnable but waiting for a CPU / wall time (a shared machine's doing).",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------ environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _twins() -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for name in ("RateLimiter", "ConcurrencyLimiter", "TimeoutManager"):
        found[name] = {}
        for kind in KINDS:
            try:
                mtaio_class(name, kind)
                found[name][kind] = "available"
            except NotAvailable as exc:
                found[name][kind] = str(exc)
    return found


def environment() -> dict[str, Any]:
    """The machine, interpreter and package versions a run used."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "load_average": list(load) if load else None,
        },
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "build": sys.version,
            "gil_enabled": getattr(sys, "_is_gil_enabled", lambda: True)(),
        },
        "mtaio": {
            "version": mtaio.__version__,
            "path": os.path.dirname(mtaio.__file__),
            "active_implementation": IMPLEMENTATION,
            "twins_registered": sorted(_TWINS),
            "classes": _twins(),
        },
        "packages": {name: _version(name) for name in PACKAGES},
    }


def environment_text(env: dict[str, Any]) -> str:
    m, py, mt = env["machine"], env["python"], env["mtaio"]
    load = m["load_average"]
    load_text = f", load average {load[0]:.2f}" if load else ""
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    lines = [
        f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['platform']}{load_text}",
        f"python:  {py['implementation']} {py['version']} {py['build'].split(' ', 1)[-1]}",
        f"mtaio:   {mt['version']} from {mt['path']} (active: {mt['active_implementation']})",
        f"versions: {packages}",
        f"date:    {env['date']}",
    ]
    for name, kinds in mt["classes"].items():
        for kind, state in kinds.items():
            if state != "available":
                lines.append(f"note:    {name} [{kind}] is not measured: {state}")
    if any(
        kinds.get("cython") not in ("available", None) and name in mt["twins_registered"]
        for name, kinds in mt["classes"].items()
    ):
        lines.append(
            "note:    to measure the compiled core, build it in place: "
            "pip install -e . (or python setup.py build_ext --inplace)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- outputs


def write_json(
    path: Path,
    env: dict[str, Any],
    settings: dict[str, Any],
    measured: Sequence[Measured],
    ratios: Sequence[RatioResult],
    accuracy: Sequence[AccuracyResult],
    accuracy_errors: dict[str, str],
) -> None:
    document = {
        "environment": env,
        "settings": settings,
        "cases": [
            {
                "key": m.case.key,
                "group": m.case.group,
                "subject": m.case.subject,
                "label": m.case.label,
                "loop": m.loop,
                "ops_per_round": m.ops,
                "median_ns_per_op": m.median_ns,
                "ns_per_op_by_round": m.per_op_ns,
                "error": m.error,
            }
            for m in measured
        ],
        "ratios": [
            {
                "section": r.ratio.section,
                "label": r.ratio.label,
                "numerator": r.ratio.numerator,
                "denominator": r.ratio.denominator,
                "target_max": r.ratio.target,
                "headline": r.ratio.headline,
                "median_of_round_ratios": r.per_loop,
                "ratio_of_medians": r.of_medians,
                "round_ratio_quartiles": r.quartiles,
                "met": r.met,
            }
            for r in ratios
        ],
        "accuracy": [{**asdict(r), "window_ratio": r.window_ratio} for r in accuracy],
        "accuracy_not_run": accuracy_errors,
    }
    path.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def write_chart(
    path: Path, measured: Sequence[Measured], loops: Sequence[str], env: dict[str, Any]
) -> None:
    """Horizontal bars of the median time per operation, one panel per group (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    by_key = {(m.loop, m.case.key): m for m in measured}
    groups: dict[str, list[Measured]] = {}
    for m in measured:
        if m.loop == loops[0]:
            groups.setdefault(m.case.group, []).append(m)
    heights = [len(v) for v in groups.values()]
    fig, axes = plt.subplots(
        len(groups),
        1,
        figsize=(10, 0.3 * len(loops) * sum(heights) / 2 + 0.9 * len(groups) + 0.6),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
        layout="constrained",
    )
    colours = ("#4C72B0", "#DD8452", "#55A868")
    bar = 0.8 / len(loops)
    for ax, (group, members) in zip(axes[:, 0], groups.items(), strict=True):
        values = {
            loop: [
                (found.median_ns or 0.0) if (found := by_key.get((loop, m.case.key))) else 0.0
                for m in members
            ]
            for loop in loops
        }
        drawn = [v for per_loop in values.values() for v in per_loop if v > 0]
        low, high = (min(drawn) / 1.8, max(drawn) * 3.0) if drawn else (1.0, 10.0)
        for j, loop in enumerate(loops):
            ys = [i + (j - (len(loops) - 1) / 2) * bar for i in range(len(members))]
            ax.barh(ys, values[loop], height=bar, color=colours[j % len(colours)], label=loop)
            for y, v in zip(ys, values[loop], strict=True):
                text, x = (f" {v:,.0f}", v) if v else (" not available", low)
                ax.text(x, y, text, va="center", fontsize=7, color="black" if v else "grey")
        ax.set_yticks(range(len(members)))
        ax.set_yticklabels([m.case.label for m in members], fontsize=8)
        for tick, m in zip(ax.get_yticklabels(), members, strict=True):
            if m.case.label.startswith("mtaio"):
                tick.set_fontweight("bold")
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(GROUPS.get(group, group), fontsize=9, loc="left")
        unit = "ns per task" if group == "contended" else "ns per operation"
        ax.set_xlabel(f"{unit}, median (log scale, lower is faster)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    py = env["python"]
    fig.suptitle(
        f"mtaio {env['mtaio']['version']} beside its peers: {py['implementation']} "
        f"{py['version']}, {env['machine']['cpu']} ({env['machine']['logical_cpus']} CPUs)",
        fontsize=9,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
