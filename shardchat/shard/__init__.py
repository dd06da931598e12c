"""One shard's I/O: the connection adapter and the loop that drives the engine."""
