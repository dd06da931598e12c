"""The broker over Redis (``broker.kind = "redis"``): several boxes as one service.

Nothing is imported here, so that the pure :mod:`.wire` imports no I/O: the
broker is :class:`shardchat.brokers.redis.broker.RedisBroker`.
"""
