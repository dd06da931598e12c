"""`shardchat chat` driven through a pseudo-terminal, as a person would use it: Ctrl-C
quits at once with 0, a refusal prints its reason and exits non-zero, join/leave and
reconnect lines, and the URL from the effective configuration."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import tempfile
from collections.abc import Iterator

from shardchat.testing.wait import wait_until
from tests.support.helpers import (
    SHARDCHAT,
    Server,
    connect_client,
    free_port,
    running_server,
)


class Terminal:
    """``shardchat`` on a pty: what it printed, what we typed."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            os.chdir(tempfile.gettempdir())  # no ./config.toml
            os.execve(SHARDCHAT, [SHARDCHAT, *args], {**os.environ, **(env or {})})
        self.output = ""
        self.code: int | None = None

    def _read(self, timeout: float) -> None:
        import select

        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            with contextlib.suppress(OSError):  # EIO once the child is gone
                self.output += os.read(self.fd, 65536).decode(errors="replace")

    def expect(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        def printed() -> re.Match[str] | None:
            self._read(0.05)
            return re.search(pattern, self.output)

        return wait_until(printed, timeout, lambda: f"never printed {pattern!r}:\n{self.output}", 0)

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 10) -> int:
        def ended() -> bool:
            if self.code is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.code = os.waitstatus_to_exitcode(status)
                else:
                    self._read(0.05)
            return self.code is not None

        wait_until(ended, timeout, lambda: f"still running:\n{self.output}", 0)
        self._read(0)
        assert self.code is not None
        return self.code

    def close(self) -> None:
        if self.code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        os.close(self.fd)


@contextlib.contextmanager
def terminal(*args: str, env: dict[str, str] | None = None) -> Iterator[Terminal]:
    term = Terminal(*args, env=env)
    try:
        yield term
    finally:
        term.close()


async def test_chat_in_a_terminal_and_ctrl_c(server: Server) -> None:
    with terminal("chat", "--user", "typist", "--room", "tty", server.url) as term:
        term.expect(r"\* typist in tty \(shard \d\)")
        term.type("hello from the terminal\n")
        term.expect(r"\[1\] typist: hello from the terminal")
        other = await connect_client(server.url, user="visitor", rooms=["tty"])
        term.expect(r"\* visitor joined tty")
        await other.send(type="message", room="tty", content="hi typist", id="v1")
        term.expect(r"\[2\] visitor: hi typist")
        await other.close()
        term.expect(r"\* visitor left tty")
        term.type("\x03")  # Ctrl-C, with no Enter after it
        assert term.wait() == 0
        assert "Traceback" not in term.output


def test_a_bad_name_exits_non_zero_with_the_reason(server: Server) -> None:
    with terminal("chat", "--user", "no spaces", "--room", "tty", server.url) as term:
        assert term.wait() == 1
        assert "HTTP 400" in term.output and "user must be 1-64 characters" in term.output
    with terminal("chat", "--user", "ok", "--room", "bad room", server.url) as term:
        assert term.wait() == 1
        assert "bad_request" in term.output and "room" in term.output


def test_nothing_listening_exits_non_zero() -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws"
    with terminal("chat", "--user", "ada", "--room", "r", "--timeout", "1", url) as term:
        assert term.wait() == 1
        assert "unavailable" in term.output


def test_url_from_the_configuration(server: Server) -> None:
    env = {"SHARDCHAT_SERVER_PORT": str(server.port)}
    with terminal("chat", "--user", "configured", "--room", "cfg", env=env) as term:
        term.expect(r"\* configured in cfg")
        term.type("/quit\n")
        assert term.wait() == 0


def test_reconnecting_and_back_after_kill_9() -> None:
    with running_server(workers=2) as srv:
        with terminal("chat", "--user", "steady", "--room", "rc", srv.url) as term:
            shard = int(term.expect(r"\(shard (\d)\)").group(1))
            os.kill(srv.shard_pids()[shard], signal.SIGKILL)
            term.expect(r"\* reconnecting…")
            term.expect(r"\* back \(recovered\)")
            term.type("still here\n")
            term.expect(r"\[1\] steady: still here")
            term.type("\x03")
            assert term.wait() == 0
