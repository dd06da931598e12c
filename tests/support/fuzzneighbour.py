"""The fuzz tests' well-behaved neighbour, as a process: ``python -m
tests.support.fuzzneighbour URL``. A member of room "calm" and a publisher that sends
(waiting for each ack) until stdin closes; then the member reads until it has
every message, and one JSON line reports what was sent and received."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from tests.support.helpers import connect_client, scaled


async def main(url: str) -> None:
    member = await connect_client(url, user="calm-member")
    publisher = await connect_client(url, user="calm-publisher")
    await member.join("calm")
    await publisher.join("calm")
    loop = asyncio.get_running_loop()
    stopped = loop.run_in_executor(None, sys.stdin.read)  # returns at EOF
    print("ready", flush=True)
    sent: list[str] = []
    while not stopped.done():
        content = f"n{len(sent)}"
        await publisher.request("message", "ack", room="calm", content=content)
        sent.append(content)
        await asyncio.sleep(0.01)
    got: list[str] = []
    while len(got) < len(sent):
        frame = await member.recv(10)
        if frame["type"] == "message" and frame["sender"] == "calm-publisher":
            got.append(frame["content"])
    print(json.dumps({"sent": len(sent), "got": len(got), "in_order": got == sent}), flush=True)
    await member.close()
    await publisher.close()


class Neighbour:
    """This module in its own process (hypothesis forbids the random module
    being used while it generates, and a client library in a thread here would)."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fuzzneighbour", url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).parent.parent.parent,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ready\n"

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()

    def check(self) -> None:
        self.stop()
        assert self.proc.stdout is not None
        try:
            out = self.proc.stdout.read()
            self.proc.wait(scaled(60))
        finally:
            self.proc.stdout.close()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        result = json.loads(out)
        assert result["sent"] > 10, result
        assert result["got"] == result["sent"] and result["in_order"], result


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
