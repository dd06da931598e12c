"""The room store: rooms' history, seq, epoch and idempotency keys on the box's disk."""
