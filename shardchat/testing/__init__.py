"""Pieces shared by the tests and the benchmarks (never imported by the server): a
raw WebSocket client's wire (:mod:`.rawws`), waiting for a condition (:mod:`.wait`), rooms
placed on a chosen shard (:mod:`.rooms`) and certificates (:mod:`.pki`)."""
