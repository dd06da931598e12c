"""Brokers: what carries records between room engines (shared memory on one box)."""
