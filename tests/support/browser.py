"""Debian's Chromium under Playwright for the browser tests (and the TLS test's
page over https), and where their screenshots go (tests/artifacts/, gitignored)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.support.helpers import scaled

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).parent.parent / "artifacts"


def ms(seconds: float) -> float:
    return scaled(seconds) * 1000


@contextlib.asynccontextmanager
async def launched(*extra: str) -> AsyncIterator[Any]:
    """A headless Chromium (with ``extra`` command-line switches), closed on the way out."""
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, *extra])
        try:
            yield chromium
        finally:
            await chromium.close()


async def shot(page: Any, name: str) -> None:
    """A full-page screenshot of ``page``: tests/artifacts/``name``.png."""
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
