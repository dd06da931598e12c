"""Benchmarks: ``lib`` (the load library: servers under test, the load generator,
the ping prober, the baseline server), ``scenarios`` (a real server under load),
``micro`` (one part measured in-process) and ``compare`` (this checkout against
another, in one run). Figures in perf/RESULTS.md; tests in perf/tests. perf/
and tests/ never import each other: what both need is in shardchat.testing."""
