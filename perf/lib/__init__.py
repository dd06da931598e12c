"""The load library: servers under test started and measured, the load generator,
its connections, the ping prober, the baseline server, a fast backend, charts."""
