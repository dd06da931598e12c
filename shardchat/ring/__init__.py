"""The shared-memory ring: byte layout, writer and reader over a memoryview, record payloads."""
