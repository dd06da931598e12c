"""One box's broker: every shard writes its own ring and reads all the others.

docs/ARCHITECTURE.md, One box. :class:`ShmBroker` is the
:class:`~shardchat.core.broker.Broker` of one shard: it writes our ring (our
publishes, forwards, presence, history requests and answers) and hands the
records of the peers' rings to our engine through its
:class:`~shardchat.core.broker.BrokerListener` methods. A room's order is
set here: the room's owner shard sequences (:mod:`~shardchat.brokers.sequencer`), and a
publish on another shard is forwarded to it through our ring and kept until
it comes back sequenced (:mod:`~shardchat.brokers.forwarding`).

It never schedules: the shard's main module calls :meth:`commit` at the end
of each loop turn, :meth:`read_peers` when the doorbell rings (and again while it
returns True), and :meth:`tick` on its timer. An ack for a publish leaves
only once the record is committed (visible in the ring), so that an acked
message is in the ring before the client hears of it.

The broker is one class, :class:`ShmBroker` (:mod:`.broker`), made of parts
with one job each: the shared state and the writing of our ring
(:mod:`.state`), publishes (:mod:`.sequencing`), presence (:mod:`.presence`),
fills (:mod:`.history`), the reading of the peers' rings (:mod:`.reading`) and
the start-up (:mod:`.recovery`).
"""

from shardchat.brokers.shm.broker import ShmBroker
from shardchat.brokers.shm.state import POLL_LIMIT, Bell

__all__ = ["POLL_LIMIT", "Bell", "ShmBroker"]
