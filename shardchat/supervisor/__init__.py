"""The supervisor side: fork, restart and drain the shards; the admin port and metrics."""
