"""Pieces shared by the tests and the benchmarks (never imported by the server): a
raw WebSocket client's wire (:mod:`.rawws`) and waiting for a condition (:mod:`.wait`)."""
