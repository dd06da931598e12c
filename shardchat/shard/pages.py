"""The shard's plain HTTP answers: the chat page (with its CSP), the JavaScript
client and /healthz."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

__all__ = ["TEXT", "Pages", "page_csp"]

TEXT = "text/plain; charset=utf-8"
_STATIC = Path(__file__).parent.parent / "static"
_CHAT_PAGE = _STATIC / "index.html"
# The JavaScript client, for pages that import it without a bundler.
_CLIENT_JS = _STATIC / "shardchat.js"


class Pages:
    """What a plain GET on the main port answers."""

    def __init__(self) -> None:
        self.chat_page = _CHAT_PAGE.read_bytes()
        self.client_js = _CLIENT_JS.read_bytes()
        self.csp = page_csp(self.chat_page)

    def get(self, path: str, draining: bool) -> tuple[int, str, bytes]:
        """Status, content type and body for ``path``."""
        if path == "/healthz":
            if draining:
                return 503, TEXT, b"draining\n"
            return 200, TEXT, b"ok\n"
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", self.chat_page
        if path == "/shardchat.js":
            return 200, "text/javascript; charset=utf-8", self.client_js
        return 404, TEXT, b"not found\n"


def page_csp(page: bytes) -> str:
    """The chat page's Content-Security-Policy: its own inline script and style by
    hash, scripts of this origin (the page imports /shardchat.js), WebSockets to
    this origin, nothing else (no framing, no other origins)."""
    hashes = {
        kind: " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
            for body in re.findall(
                rb"<" + kind.encode() + rb"(?:\s[^>]*)?>(.*?)</" + kind.encode(), page, re.S
            )
        )
        for kind in ("script", "style")
    }
    return (
        f"default-src 'none'; script-src 'self' {hashes['script']}; style-src {hashes['style']}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
