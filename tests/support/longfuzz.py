"""A long seeded fuzz run of the whole server path (not in the suite).

    python -m tests.support.longfuzz --seed 12 --frames 20000

The frames of tests/integration/test_fuzz.py (tests/support/fuzzframes.py: fragmented, nested,
oversized, bad UTF-8, control frames between fragments, reserved opcodes and
bits, unmasked and oversized control frames, close frames), sent by hypothesis
from a fixed seed to a live one-shard server until ``--frames`` have gone, with
the fuzz test's neighbour publishing and receiving in its room throughout.
Prints one JSON line: examples, frames, how the connections ended (close code
counts), the neighbour's messages, and the tracebacks and error lines in the
server's log (both must be 0). Exit code 1 on any failure.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

from hypothesis import HealthCheck, given, seed, settings

from tests.support.fuzzframes import FUZZ_SETTINGS, Frame, examples, run_example
from tests.support.fuzzneighbour import Neighbour
from tests.support.helpers import running_server


class Done(BaseException):
    """Stops hypothesis once enough frames went (or at the first failure)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--frames", type=int, default=20_000)
    args = parser.parse_args()
    ends: collections.Counter[str] = collections.Counter()
    counts = {"examples": 0, "frames": 0}
    failures: list[str] = []
    started = time.monotonic()
    with running_server(workers=1, settings=FUZZ_SETTINGS) as server:
        neighbour = Neighbour(server.url)

        @seed(args.seed)
        @settings(
            max_examples=10**9,
            deadline=None,
            database=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
        )
        @given(examples)
        def fuzz(frames: list[Frame]) -> None:
            if counts["frames"] >= args.frames or failures:
                raise Done
            try:
                outcome = run_example(server.port, frames, 10.0)
            except Exception as exc:
                failures.append(f"{exc!r} after {frames}")
                raise Done from None
            counts["examples"] += 1
            counts["frames"] += outcome.frames_sent
            ends["open" if outcome.code is None else str(outcome.code)] += 1

        try:
            fuzz()
        except Done:
            pass
        finally:
            neighbour.stop()
        neighbour_ok = True
        try:
            neighbour.check()
        except AssertionError as exc:
            neighbour_ok = False
            failures.append(f"neighbour: {exc}")
        log = server.log_path.read_text(errors="replace")
        events = server.log_events()
    report = {
        "seed": args.seed,
        "seconds": round(time.monotonic() - started, 1),
        **counts,
        "ends": dict(sorted(ends.items())),
        "neighbour_in_order": neighbour_ok,
        "tracebacks": log.count("Traceback"),
        "error_lines": sum(1 for e in events if e.get("level") == "error" or "exc" in e),
        "failures": failures[:3],
    }
    print(json.dumps(report))
    return 1 if failures or report["tracebacks"] or report["error_lines"] else 0


if __name__ == "__main__":
    sys.exit(main())
