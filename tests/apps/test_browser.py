"""The studio in a real browser: Debian Chromium driven by Playwright (never `playwright install`).

Loads the page, enables two adapters with different weights, clicks Generate and finds the image in the gallery.
The screenshot is a test artifact (path printed; also copied to docs/studio.png when STUDIO_SCREENSHOT_DOCS=1).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _row(page, key: str, timeout: float = 30.0) -> int:
    """The index of the adapter row whose checkbox is labelled ``key`` (polled: a loaded machine renders slowly)."""
    deadline = time.monotonic() + timeout
    while True:
        for i in range(24):
            box = page.locator(f"#adapter-enable-{i}")
            if box.count() and box.is_visible() and key in box.inner_text():
                return i
        if time.monotonic() > deadline:
            labels = [page.locator(f"#adapter-enable-{i}").inner_text() for i in range(24)
                      if page.locator(f"#adapter-enable-{i}").count()]
            raise AssertionError(f"no adapter row for {key!r}; rows: {labels}")
        time.sleep(0.5)


def test_enable_two_adapters_and_generate(served, studio_files, tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing and could not be installed (make test runs apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed (dev extra)")
    keys = studio_files[2]
    shots = tmp_path_factory.mktemp("browser")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="chromium-"), executable_path=str(CHROMIUM),
                                                   headless=True, args=ARGS, viewport={"width": 1400, "height": 1000})
        try:
            page = ctx.new_page()
            page.goto(served[1], wait_until="domcontentloaded")
            page.wait_for_selector("#generate", timeout=60_000)
            for key, weight in ((keys["style"], "0.8"), (keys["subject"], "-0.5")):
                i = _row(page, key)
                page.locator(f"#adapter-enable-{i} input[type=checkbox]").check()
                number = page.locator(f"#adapter-weight-{i} input[type=number]")
                number.fill(weight)
                number.press("Enter")
            page.locator("#prompt textarea").fill("a handwritten digit seven")
            page.click("#generate")
            page.wait_for_selector("#gallery img", timeout=60_000)
            page.wait_for_function("document.querySelector('#infotext textarea').value.includes('<adapter:')",
                                   timeout=30_000)
            text = page.locator("#infotext textarea").input_value()
            shot = page.screenshot(path=str(shots / "studio.png"), full_page=True)
        finally:
            ctx.close()
    print(f"studio screenshot: {shots / 'studio.png'}")
    assert f"<adapter:{keys['style']}:0.8>" in text and f"<adapter:{keys['subject']}:-0.5>" in text
    assert len(shot) > 10_000
    if os.environ.get("STUDIO_SCREENSHOT_DOCS") == "1":
        shutil.copy(shots / "studio.png", Path(__file__).resolve().parents[2] / "docs" / "studio.png")
