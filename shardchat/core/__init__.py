"""The pure core: protocol, room logic, admission and the room engine. No I/O."""
