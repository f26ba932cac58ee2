"""mtaio's benchmark harness: every hot path beside its peers, and the rate-accuracy scenario.

- ``python -m bench`` (``--quick`` for a run of about a minute) runs everything, prints the
  table of ratios, and writes ``bench/results/benchmark.json`` and ``benchmark.png``.
- ``pytest bench/ --benchmark-only`` runs the same cases as pytest-benchmark suites.

Modules: ``cases`` (what is measured, mtaio and peers), ``accuracy`` (the real-time rate
scenario), ``runner`` (interleaved timing), ``report`` (ratios, table, JSON, chart, machine),
``conftest`` / ``suite`` / ``test_*`` (the pytest-benchmark suites). ``docs/performance.md``
explains every number. Nothing here runs in the default ``pytest`` (``testpaths =
["tests"]``), and nothing asserts on a time.
"""
