"""Chromium through Playwright for the dashboard's browser tests.

Debian's ``/usr/bin/chromium`` (``apt-get install chromium``; ``.ci/run`` installs it), never a
browser Playwright downloads. Missing, the test fails (tests/parts.py): a dashboard test that
skips proves nothing. Screenshots go to ``var/test-artifacts/screenshots/`` (gitignored).

Playwright's *async* API: the tests and the in-process hub share pytest-asyncio's event loop
(the sync API refuses to run inside a running loop).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from tests.parts import missing_part

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

CHROMIUM = Path(os.environ.get("TWIN_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = Path(__file__).resolve().parents[1] / "var" / "test-artifacts" / "screenshots"
TABLET = {"width": 768, "height": 1024}
"""A technician's tablet in portrait: the narrowest layout the dashboard must work at."""
DESKTOP = {"width": 1280, "height": 900}


@contextlib.asynccontextmanager
async def launch() -> AsyncIterator[Browser]:
    """A headless Chromium, closed afterwards."""
    if not CHROMIUM.exists():
        missing_part(f"Chromium at {CHROMIUM}", "apt-get install chromium")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing_part("the playwright Python package", "pip install -e '.[dev]'")
    # As root (containers, CI) Chromium refuses to start with its sandbox.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            yield browser
        finally:
            await browser.close()


async def screenshot(page: Page, name: str) -> Path:
    """Save a full-page screenshot as a test artefact; its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
