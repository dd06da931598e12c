"""Micro-benchmarks: one part of the server measured in-process (the ring, the
embedded stores)."""
