"""Scenarios: a real server under load, each a command that prints its figures and
writes perf/results/NAME.json."""
