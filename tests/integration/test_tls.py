"""wss:// end to end with a certificate the test makes itself: ChatClient, the
websockets client, `shardchat chat`, the page in Chromium over https://, and
client certificates (server.tls_client_ca)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

from shardchat.api import ApiClient, AsyncApiClient
from shardchat.client.chatclient import ChatClient
from shardchat.testing.pki import Pki, make_pki
from tests.support.api import KEY
from tests.support.browser import CHROMIUM, launched
from tests.support.helpers import SHARDCHAT, Server, assert_no_traceback, running_server, scaled


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[Server]:
    settings = [f'server.tls_cert="{pki.cert}"', f'server.tls_key="{pki.key}"']
    with running_server(workers=2, settings=settings, env={"SHARDCHAT_API_KEY": KEY}) as server:
        yield server


def wss(server: Server) -> str:
    return f"wss://127.0.0.1:{server.port}/ws"


def client_context(pki: Pki, with_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if with_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


async def test_chat_client_over_wss(tls_server: Server, pki: Pki) -> None:
    """ChatClient and the websockets client chat over wss://; ws:// to the TLS port
    gets no WebSocket."""
    context = client_context(pki)
    async with (
        ChatClient(wss(tls_server), user="ada", rooms=["tls"], ssl=context) as ada,
        connect(wss(tls_server) + "?user=grace&room=tls", ssl=context) as grace,
    ):
        assert json.loads(await grace.recv())["type"] == "welcome"
        assert json.loads(await grace.recv())["type"] == "joined"
        seq = await ada.send("tls", "over tls")
        while (frame := json.loads(await grace.recv()))["type"] != "message":
            pass
        assert (frame["content"], frame["seq"], frame["sender"]) == ("over tls", seq, "ada")
        await grace.send(json.dumps({"type": "message", "room": "tls", "content": "back"}))
        async for message in ada.messages():
            if message.content == "back":
                break
    with pytest.raises(Exception):  # noqa: B017 - a TLS port does not speak plain HTTP
        async with connect(f"ws://127.0.0.1:{tls_server.port}/ws", open_timeout=scaled(5)):
            pass


async def test_shardchat_chat_over_wss(tls_server: Server, pki: Pki) -> None:
    """`shardchat chat --cafile CA wss://...` sends the lines typed."""
    context = client_context(pki)
    async with connect(wss(tls_server) + "?user=reader&room=term", ssl=context) as reader:
        json.loads(await reader.recv())
        json.loads(await reader.recv())
        proc = await asyncio.create_subprocess_exec(
            SHARDCHAT,
            "chat",
            "--user",
            "typist",
            "--room",
            "term",
            "--cafile",
            str(pki.ca),
            wss(tls_server),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdin is not None
        try:
            while True:
                frame = json.loads(await asyncio.wait_for(reader.recv(), scaled(20)))
                if frame["type"] == "join" and frame["sender"] == "typist":
                    break
            proc.stdin.write(b"typed over tls\n")
            await proc.stdin.drain()
            while (frame := json.loads(await asyncio.wait_for(reader.recv(), scaled(20))))[
                "type"
            ] != "message":
                pass
            assert (frame["sender"], frame["content"]) == ("typist", "typed over tls")
            proc.stdin.write(b"/quit\n")
            await proc.stdin.drain()
            assert await asyncio.wait_for(proc.wait(), scaled(20)) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_the_server_api_over_https(tls_server: Server, pki: Pki) -> None:
    """The server API on the TLS port, kept alive, from both Python clients."""
    url = f"https://127.0.0.1:{tls_server.port}"
    with ApiClient(url, KEY, ssl=client_context(pki)) as api:
        assert [api.publish("tlsapi", str(i))["seq"] for i in range(3)] == [1, 2, 3]
        assert len(api.history("tlsapi")["messages"]) == 3
    async with AsyncApiClient(url, KEY, ssl=client_context(pki)) as aio:
        assert (await aio.publish("tlsapi", "3"))["seq"] == 4
        assert (await aio.info())["broker"] == "shm"
    assert_no_traceback(tls_server)


async def test_page_over_https(tls_server: Server, pki: Pki) -> None:
    """The chat page over https:// connects with wss:// and chats (Chromium trusts
    the test's certificate through ignore_https_errors)."""
    assert os.path.exists(CHROMIUM)
    async with launched() as browser:
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()
        await page.goto(f"https://127.0.0.1:{tls_server.port}/")
        await page.fill("#user", "webby")
        await page.fill("#room", "tlsweb")
        await page.click("#connect")
        await page.wait_for_selector('#status[data-state="connected"]')
        await page.fill("#text", "hello over wss")
        await page.press("#text", "Enter")
        await page.wait_for_selector("#log li.msg .content >> text=hello over wss")
        assert await page.locator("#log li.msg .who").all_inner_texts() == ["webby"]


async def test_client_certificates(pki: Pki) -> None:
    """server.tls_client_ca: a client without a certificate is refused in the TLS
    handshake; one with a certificate the CA signed connects."""
    settings = [
        f'server.tls_cert="{pki.cert}"',
        f'server.tls_key="{pki.key}"',
        f'server.tls_client_ca="{pki.ca}"',
    ]
    with running_server(workers=1, settings=settings) as server:
        async with connect(wss(server) + "?user=mutual", ssl=client_context(pki, True)) as ws:
            assert json.loads(await ws.recv())["user"] == "mutual"
        # TLS 1.3: the client's handshake ends before the server's alert arrives, so the
        # refusal shows as a connection lost before the HTTP response.
        with pytest.raises((ssl.SSLError, OSError, InvalidHandshake)):
            async with connect(wss(server), ssl=client_context(pki), open_timeout=scaled(5)) as ws:
                await ws.recv()
        # Garbage instead of a TLS ClientHello: dropped, with no traceback logged.
        answer = await asyncio.to_thread(raw_garbage, server.port)
        assert not answer.startswith(b"HTTP")  # nothing, or a TLS alert
        # Connections whose TLS handshake failed are forgotten at the handshake
        # deadline (5 s), so a drain (10 s) does not wait for them.
        server.stop()
        assert not [e for e in server.log_events() if e.get("event") == "drain_timeout"]
        assert_no_traceback(server)


def raw_garbage(port: int) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock.recv(100)
