"""The studio in a real browser: Debian Chromium driven by Playwright (never `playwright install`).

Loads the page, enables adapters with different weights, clicks Generate and finds the image in the gallery; adds an
adapter that sorts first and checks that Refresh, a reload and the filter keep every tick on its adapter. The
screenshot is a test artifact (path printed; also copied to docs/studio.png when STUDIO_SCREENSHOT_DOCS=1).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ROWS = 24


@contextlib.contextmanager
def _page(url: str, width: int = 1400, height: int = 1000):
    """A fresh Chromium page on the studio (skips where Chromium or python playwright is missing)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing and could not be installed (make test runs apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed (dev extra)")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="chromium-"), executable_path=str(CHROMIUM),
                                                   headless=True, args=ARGS,
                                                   viewport={"width": width, "height": height})
        try:
            page = ctx.new_page()
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#generate", timeout=60_000)
            yield page
        finally:
            ctx.close()


def _row(page, key: str, timeout: float = 30.0) -> int:
    """The index of the adapter row whose checkbox is labelled ``key`` (polled: a loaded machine renders slowly)."""
    deadline = time.monotonic() + timeout
    while True:
        for i in range(ROWS):
            box = page.locator(f"#adapter-enable-{i}")
            if box.count() and box.is_visible() and key in box.inner_text():
                return i
        if time.monotonic() > deadline:
            raise AssertionError(f"no adapter row for {key!r}; rows: {list(_rows(page))}")
        time.sleep(0.5)


ROWS_JS = """(n) => {
  const out = [];
  for (let i = 0; i < n; i++) {
    const box = document.getElementById(`adapter-enable-${i}`);
    if (!box || box.offsetParent === null) continue;  // hidden slot
    const weight = document.querySelector(`#adapter-weight-${i} input[type=number]`);
    out.push([box.innerText.trim().split("\\n")[0].trim(), box.querySelector("input[type=checkbox]").checked,
              parseFloat(weight.value)]);
  }
  return out;
}"""


def _rows(page) -> dict[str, tuple[bool, float]]:
    """The visible rows: the first line of each row's label (its key) -> (ticked, weight), read in one go (a redraw
    between separate reads would mix two states)."""
    return {key: (on, w) for key, on, w in page.evaluate(ROWS_JS, ROWS)}


def _tick(page, key: str, weight: str) -> None:
    i = _row(page, key)
    page.locator(f"#adapter-enable-{i} input[type=checkbox]").check()
    number = page.locator(f"#adapter-weight-{i} input[type=number]")
    number.fill(weight)
    number.press("Enter")


def _generate(page) -> str:
    """Click Generate and return the new infotext (once the image is in the history: the same settings give the same
    text, so a change of the text box cannot tell that the job finished)."""
    before = page.locator("#history img").count()
    page.click("#generate")
    try:
        page.wait_for_function(f"document.querySelectorAll('#history img').length > {before}", timeout=60_000)
    except Exception as e:  # an error toast says why; the screenshot shows the page
        shot = Path(tempfile.mkdtemp(prefix="studio-fail-")) / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        raise AssertionError(f"no image; the page says: {page.locator('.toast-body').all_inner_texts()}; "
                             f"screenshot: {shot}") from e
    return page.locator("#infotext textarea").input_value()


def _poll(check, page, timeout: float = 30.0):
    """``check()``'s value once it is truthy (a loaded machine renders slowly)."""
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; rows: {_rows(page)}")
        time.sleep(0.5)
    return got


def test_enable_two_adapters_and_generate(served, studio_files, tmp_path_factory):
    keys = studio_files[2]
    shots = tmp_path_factory.mktemp("browser")
    with _page(served[1]) as page:
        for key, weight in ((keys["style"], "0.8"), (keys["subject"], "-0.5")):
            _tick(page, key, weight)
        page.locator("#prompt textarea").fill("a handwritten digit seven")
        text = _generate(page)
        page.wait_for_selector("#gallery img", timeout=60_000)
        shot = page.screenshot(path=str(shots / "studio.png"), full_page=True)
    print(f"studio screenshot: {shots / 'studio.png'}")
    assert f"<lora:{keys['style']}:0.8>" in text and f"<adapter:{keys['subject']}:-0.5>" in text
    assert len(shot) > 10_000
    if os.environ.get("STUDIO_SCREENSHOT_DOCS") == "1":
        shutil.copy(shots / "studio.png", Path(__file__).resolve().parents[2] / "docs" / "studio.png")


def test_refresh_keeps_each_selection_on_its_adapter(served, studio_files):
    """Issue 28: ticks and weights stayed on row positions, so an adapter that sorts first took them over."""
    root, keys = studio_files[1], studio_files[2]
    first = root / "aaa-first"  # a LoRA (a copy of labs/style) whose key sorts before every other
    with _page(served[1]) as page:
        _tick(page, keys["style"], "0.8")
        _tick(page, keys["erase"], "0.4")
        shutil.copytree(root / keys["style"], first)
        try:
            page.click("#refresh")
            _row(page, "aaa-first")
            rows = _poll(lambda: next((r for r in [_rows(page)] if r.get(keys["style"]) == (True, 0.8)), None), page)
            assert rows["aaa-first"] == (False, 1.0) and rows[keys["erase"]] == (True, 0.4)
            assert all(not on for key, (on, _) in rows.items() if key not in (keys["style"], keys["erase"]))
            # rows are grouped by method: a header above the first row of each group
            groups = [page.locator(f"#adapter-group-{i}").inner_text().strip() for i in range(ROWS)
                      if page.locator(f"#adapter-group-{i}").is_visible()]
            assert groups == sorted(groups) and {"lora", "spm", "krona", "csc"} <= set(groups)
            # the filter hides rows, not selections: Generate still uses the hidden LoRA
            page.locator("#adapter-filter textarea").fill("spm")
            _poll(lambda: list(_rows(page)) == [keys["erase"]], page)
            assert _rows(page)[keys["erase"]] == (True, 0.4)
            text = _generate(page)
            assert f"<lora:{keys['style']}:0.8>" in text and f"<adapter:{keys['erase']}:0.4>" in text
            assert "aaa-first" not in text
            # a reload lists the folder as it is now (a fresh session: nothing ticked)
            page.reload(wait_until="domcontentloaded")
            page.wait_for_selector("#generate", timeout=60_000)
            _row(page, "aaa-first")
        finally:
            shutil.rmtree(first)


def _number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Tab")


def test_two_quick_clicks_give_two_images_in_order(served):
    """Issue 28: a second Generate while one ran was dropped; now it queues (Ctrl+Enter is the second click), the
    page says it is busy, the history holds both in click order and a click on one recalls its settings."""
    with _page(served[1], 1280, 800) as page:
        _number(page, "steps", "120")  # long enough that the second click lands while the first job runs
        _number(page, "seed", "1")
        page.click("#generate")
        _poll(lambda: "busy" in page.locator("#status").inner_text(), page)
        _number(page, "seed", "2")
        page.locator("#prompt textarea").focus()  # (Enter on the focused "randomise" box would tick it)
        page.keyboard.press("Control+Enter")
        _poll(lambda: page.locator("#history img").count() == 2, page, timeout=90)
        captions = page.locator("#history").inner_text()
        assert captions.index("#1 · seed 1") < captions.index("#2 · seed 2")
        _poll(lambda: page.locator("#status").inner_text().strip() == "ready", page)
        page.locator("#history img").first.click()
        _poll(lambda: page.locator("#seed input[type=number]").input_value() == "1", page)
        # reuse seed: the seed used goes back into the seed box
        _number(page, "seed", "5")
        page.click("#reuse-seed")
        _poll(lambda: page.locator("#seed input[type=number]").input_value() == "2", page)


def test_the_whole_image_is_in_view_at_1280x800(served, tmp_path_factory):
    """Issue 28: at 1280 px the gallery showed a cropped band of the image, below the fold."""
    shots = tmp_path_factory.mktemp("layout")
    with _page(served[1], 1280, 800) as page:
        _generate(page)
        img = page.locator("#gallery img").first
        img.wait_for(timeout=60_000)
        box = img.bounding_box()
        fit = img.evaluate("e => getComputedStyle(e).objectFit")
        frame = page.locator("#gallery .grid-wrap").bounding_box()  # what the gallery shows (it scrolls inside)
        page.screenshot(path=str(shots / "studio.png"))
        # A/B: the two images side by side, large, in the result column
        _tab(page, "A/B")
        page.click("#compare")
        page.wait_for_selector("#ab-a img", timeout=60_000)
        page.wait_for_selector("#ab-b img", timeout=60_000)
        page.locator("#ab-view").scroll_into_view_if_needed()
        a, b = (page.locator(f"#ab-{x} img").first.bounding_box() for x in "ab")
        ab_fit = page.locator("#ab-a img").first.evaluate("e => getComputedStyle(e).objectFit")
        page.screenshot(path=str(shots / "studio-ab.png"))
    with _page(served[1], 390, 844) as phone:
        _generate(phone)
        phone.locator("#gallery img").first.wait_for(timeout=60_000)
        phone.locator("#gallery").scroll_into_view_if_needed()
        phone.screenshot(path=str(shots / "studio-phone.png"))
    assert fit in ("contain", "scale-down"), fit  # never "cover": the whole image at its aspect ratio
    assert box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= 1280 and box["y"] + box["height"] <= 800
    assert frame["y"] <= box["y"] and box["y"] + box["height"] <= frame["y"] + frame["height"]  # not clipped
    assert box["width"] >= 300 and box["height"] >= 300  # large, not a thumbnail
    assert ab_fit == "contain"  # drawn at the box's size (a 32 px image is not left 32 px wide), whole
    assert abs(a["y"] - b["y"]) < 2 and b["x"] >= a["x"] + a["width"] - 1  # side by side
    assert min(a["width"], b["width"], a["height"]) >= 250 and b["x"] + b["width"] <= 1280  # large, in view
    if os.environ.get("STUDIO_SCREENSHOT_DOCS") == "1":
        for name in ("studio.png", "studio-phone.png"):
            shutil.copy(shots / name, Path(__file__).resolve().parents[2] / "docs" / name)


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _pick(page, elem_id: str, option: str) -> None:
    """Choose ``option`` in the dropdown ``elem_id``."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_recall_restores_every_adapter_with_its_weight(served, studio_files, tmp_path):
    """Issue 28: recall restored the prompt and settings but not the adapters, the sampler or the method settings (a
    CSC row at 0.3 came back at the control scale's value). A history click and *Send to Generate* of the PNG both put
    back three adapters with their weights, the sampler, the control image and the control scale."""
    import numpy as np
    from PIL import Image

    studio, keys = served[0], studio_files[2]
    want = {keys["style"]: 0.8, keys["erase"]: 0.4, keys["edges"]: 0.3}
    bar = np.zeros((32, 32, 3), dtype=np.uint8)
    bar[8:24, 14:18] = 255
    Image.fromarray(bar).save(tmp_path / "control.png")
    Image.fromarray(bar * 0).save(tmp_path / "black.png")
    sampler = [s for s in studio.main.samplers if s != next(iter(studio.main.samplers))][0]
    with _page(served[1]) as page:
        _number(page, "steps", "4")
        for key, weight in want.items():
            _tick(page, key, str(weight))
        _pick(page, "sampler", sampler)
        _tab(page, "SCEdit")
        page.locator("#control input[type=file]").set_input_files(str(tmp_path / "control.png"))
        page.wait_for_selector("#control img", timeout=30_000)
        _number(page, "control-scale", "0.6")
        text = _generate(page)
        assert f"<adapter:{keys['edges']}:0.3>" in text and "Control scale: 0.6" in text and "Control image:" in text
        _poll(lambda: page.locator("#history img").count() == 1, page)

        def scramble() -> None:  # another state: one adapter off, another on, the sampler and the panel changed
            _tab(page, "Adapters")
            page.locator(f"#adapter-enable-{_row(page, keys['style'])} input[type=checkbox]").uncheck()
            _tick(page, keys["subject"], "-0.5")
            _pick(page, "sampler", next(iter(studio.main.samplers)))
            _tab(page, "SCEdit")
            page.locator("#control input[type=file]").set_input_files(str(tmp_path / "black.png"))
            _number(page, "control-scale", "1")

        def restored() -> None:
            _tab(page, "Adapters")
            rows = _poll(lambda: next((r for r in [_rows(page)] if r.get(keys["style"], (0,))[0]), None), page)
            assert {k: w for k, (on, w) in rows.items() if on} == want
            _poll(lambda: page.locator("#sampler input").input_value() == sampler, page)
            _poll(lambda: page.locator("#control-scale input[type=number]").input_value() == "0.6", page)
            # the same settings again, the control image included (its reference is its content's hash)
            assert _generate(page) == text

        scramble()
        page.locator("#history img").first.click()
        restored()
        scramble()
        newest = max(studio.out.glob("*.png"), key=lambda f: f.stat().st_mtime)
        _tab(page, "Read parameters")
        page.locator("#read-png input[type=file]").set_input_files(str(newest))
        page.click("#read")
        _poll(lambda: "Control image" in page.locator("#read-json").inner_text(), page)
        page.click("#send")
        restored()


def test_img2img_and_inpaint_in_the_page(served, tmp_path):
    """Issue 28: img2img and inpainting (SD families) with strength and a mask upload; both produce images."""
    from PIL import Image

    Image.new("RGB", (40, 24), (220, 40, 40)).save(tmp_path / "init.png")
    mask = Image.new("L", (40, 24), 0)
    mask.paste(255, (20, 0, 40, 24))
    mask.save(tmp_path / "mask.png")
    with _page(served[1]) as page:
        _number(page, "steps", "4")
        _tab(page, "img2img / inpaint")
        page.locator("#init-image input[type=file]").set_input_files(str(tmp_path / "init.png"))
        page.locator("#mask-image input[type=file]").set_input_files(str(tmp_path / "mask.png"))
        page.wait_for_selector("#mask-image img", timeout=30_000)
        _number(page, "strength", "0.5")
        for mode in ("img2img", "inpaint"):
            page.locator("#mode").get_by_label(mode, exact=True).check()
            text = _generate(page)
            assert f"Mode: {mode}" in text and "Size: 32x32" in text, text
            assert ("Mask: " in text) == (mode == "inpaint")
        assert page.locator("#history img").count() == 2


def test_switching_the_model_and_back_gives_the_same_image(served, studio_files):
    """Issue 28: a model dropdown (shipped, models folder, Hub cache) switches without a restart, the adapters
    re-validated (a UNet LoRA is unticked on dit-mini; a history click there puts the DiT class back); back on the
    first model, the same settings give the same image."""
    import numpy as np
    from PIL import Image

    studio, keys = served[0], studio_files[2]
    first = next(iter(studio.model_choices()))

    def newest() -> np.ndarray:
        with Image.open(max(studio.out.glob("*.png"), key=lambda f: f.stat().st_mtime)) as img:
            return np.asarray(img.convert("RGB"))

    def settings() -> None:
        _number(page, "steps", "3")
        _number(page, "seed", "5")

    def switch(label: str, name: str) -> None:
        _pick(page, "model", label)
        title = f"difftune studio — {name}"
        _poll(lambda: page.locator("h2").first.inner_text().replace("\n", " ").startswith(title), page, timeout=60)

    with _page(served[1], 1280, 800) as page:
        try:
            _tick(page, keys["style"], "0.7")
            settings()
            text = _generate(page)
            image = newest()
            switch("dit-mini (shipped)", "dit-mini")
            _poll(lambda: not _rows(page).get(keys["style"], (True,))[0], page)  # unticked: made for a UNet
            style_row = page.locator(f"#adapter-enable-{_row(page, keys['style'])}")
            _poll(lambda: "⚠ made for model, not dit-mini" in style_row.inner_text(), page)  # listed again
            _pick(page, "class", "3: three")
            assert "Size: 32x32" in _generate(page) and "Class: 3" in page.locator("#infotext textarea").input_value()
            # recall on a DiT: a click on the history image puts its class back
            _pick(page, "class", "0: zero")
            page.locator("#history img").last.click()
            _poll(lambda: page.locator("#class input").input_value() == "3: three", page)
            switch(first, first.split(" (")[0])
            _tick(page, keys["style"], "0.7")
            settings()
            assert _generate(page) == text and np.array_equal(newest(), image)
        finally:
            studio.switch_model(first)  # the session's other tests run on the first model
