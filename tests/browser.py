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


# Runs in the page. Checks what a machine can check of WCAG 2.2 AA on what is visible now: every
# form control has an accessible name; buttons, inputs and selects are at least 44 px high (a
# gloved finger on a tablet; 2.5.8 asks 24, Apple's and Google's guides 44-48); the page has a
# language, one h1 and a title; images drawn as SVG say what they show; ids are unique (labels
# and aria references depend on it); and nothing is wider than the screen, so a tablet in portrait
# never scrolls sideways (tables scroll inside their own box).
_AUDIT_JS = r"""() => {
  const problems = [];
  const visible = (e) => { const r = e.getBoundingClientRect(); const s = getComputedStyle(e);
    return r.width > 0 && r.height > 0 && s.visibility !== "hidden" && s.display !== "none"; };
  const name = (e) => (e.getAttribute("aria-label") || "").trim()
    || [...(e.labels || [])].map((l) => l.textContent.trim()).join(" ")
    || (e.getAttribute("aria-labelledby") || "").split(/\s+/)
      .map((id) => document.getElementById(id)?.textContent.trim() || "").join(" ").trim()
    || (e.tagName === "BUTTON" ? e.textContent.trim() : "")
    || (e.type === "submit" || e.type === "button" ? (e.value || "").trim() : "");
  const describe = (e) => `${e.tagName.toLowerCase()}${e.id ? "#" + e.id : ""}${e.name ? "[name=" + e.name + "]" : ""}`;
  for (const e of document.querySelectorAll("input:not([type=hidden]), select, textarea, button")) {
    if (!visible(e)) continue;
    if (!name(e)) problems.push(`no accessible name: ${describe(e)}`);
    const high = e.getBoundingClientRect().height;
    if (high < 43.5) problems.push(`shorter than 44 px: ${describe(e)} (${high.toFixed(1)} px)`);
  }
  if (!document.documentElement.lang) problems.push("no lang on <html>");
  if (!document.title.trim()) problems.push("no <title>");
  const h1 = [...document.querySelectorAll("h1")].filter(visible).length;
  if (h1 !== 1) problems.push(`${h1} visible h1 elements`);
  for (const svg of document.querySelectorAll("svg[role=img]")) {
    const label = (svg.getAttribute("aria-label") || "").trim() || svg.querySelector("title");
    if (!label) problems.push("svg image without a label");
  }
  const ids = new Map();
  for (const e of document.querySelectorAll("[id]")) ids.set(e.id, (ids.get(e.id) || 0) + 1);
  for (const [id, n] of ids) if (n > 1) problems.push(`id ${id} used ${n} times`);
  if (document.documentElement.scrollWidth > window.innerWidth + 1) {
    problems.push(`page ${document.documentElement.scrollWidth} px wide in a ${window.innerWidth} px window`);
  }
  return problems;
}"""


async def audit(page: Page) -> list[str]:
    """What the page, as shown now, gets wrong of the machine-checkable accessibility rules."""
    problems: list[str] = await page.evaluate(_AUDIT_JS)
    return problems


async def screenshot(page: Page, name: str) -> Path:
    """Check the page as shown (:func:`audit`, fails the test on a problem), then save a
    full-page screenshot as a test artefact; its path. Every page the tests photograph is audited,
    at desktop and at tablet width."""
    problems = await audit(page)
    assert not problems, f"{name}: {problems}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
