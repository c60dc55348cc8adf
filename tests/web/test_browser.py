"""The live page in a real headless browser (Debian's chromium, driven by Playwright).

The page must load, show each camera's image and keep updating it, and list
a sidelined item from the synthetic run with its heat-map snapshot. A
screenshot is saved as ``test-output/web/live-page.png`` (repository root).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.config import HttpConfig
from edge.web.server import start_http
from tests.web.conftest import TEST_OUTPUT, LiveNode

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    """A chromium page (Playwright drives the system browser; no downloaded browsers)."""
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1100})
            yield context.new_page()
        finally:
            browser.close()


def _camera_state(page: Any, cam: str) -> dict[str, Any]:
    state: dict[str, Any] = page.evaluate(
        """cam => { const img = document.querySelector(`img[data-camera="${cam}"]`);
                    return img ? {updates: Number(img.dataset.updates || 0), src: img.src,
                                  w: img.naturalWidth, h: img.naturalHeight}
                               : {updates: 0, src: "", w: 0, h: 0}; }""", cam)
    return state


def test_live_page_shows_updating_cameras_and_a_sidelined_snapshot(page: Any,
                                                                     live_node: LiveNode) -> None:
    """Cameras render and refresh; a sidelined item appears with its loaded heat-map sheet;
    the page reached the node without console errors."""
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("response", lambda res: errors.append(f"HTTP {res.status} {res.url}")
            if res.status >= 400 else None)
    page.goto(live_node.url + "/", wait_until="load")
    assert "conveyor-vision" in page.title()
    cams = [c.id for c in live_node.cfg.cameras]
    for cam in cams:
        page.wait_for_function(
            """cam => { const img = document.querySelector(`img[data-camera="${cam}"]`);
                        return img && img.naturalWidth > 0
                               && Number(img.dataset.updates) >= 2; }""",
            arg=cam, timeout=30_000)
    first = {cam: _camera_state(page, cam) for cam in cams}
    page.wait_for_timeout(1500)
    for cam in cams:
        later = _camera_state(page, cam)
        assert later["updates"] > first[cam]["updates"] + 2, (cam, first[cam], later)
        assert later["src"] != first[cam]["src"]
        cfg = next(c for c in live_node.cfg.cameras if c.id == cam)
        assert (later["w"], later["h"]) == (cfg.width, cfg.height)
    page.wait_for_function(
        """() => { const img = document.querySelector("#sidelined .snapshot img");
                   return img && img.complete && img.naturalWidth > 0; }""", timeout=90_000)
    card = page.locator("#sidelined .snapshot").first
    snapshot_id = card.get_attribute("data-snapshot-id")
    item_id = card.get_attribute("data-item-id")
    assert snapshot_id
    assert live_node.store.path(snapshot_id) is not None
    sidecar = live_node.store.sidecar(snapshot_id)
    assert sidecar is not None
    assert sidecar["verdict"]["item_id"] == item_id
    assert sidecar["verdict"]["decision"] == "sideline"
    assert item_id in card.inner_text()
    page.wait_for_function("() => document.querySelectorAll('#stages tr').length >= 4")
    assert "inference" in page.locator("#stages").inner_text()
    calibration = page.locator("#calibration").inner_text()
    assert "synthetic" in calibration
    assert "check ok" in calibration
    page.wait_for_timeout(700)  # one more camera refresh with the boxes drawn
    TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = TEST_OUTPUT / "live-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    assert not errors, errors


def test_live_page_works_with_a_token_that_never_appears_in_a_url(
        page: Any, live_node: LiveNode, tmp_path: Path) -> None:
    """With `http.token_file`, the page opened as `/#token=…` shows the node (status and
    updating cameras) by sending the token in the Authorization header; no request the
    browser makes carries it in its URL, and nothing is refused."""
    token = "t0ken-for-the-live-page-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    http = start_http(HttpConfig(port=0, live_page=True, token_file=tmp_path / "token"),
                      live_node.node, live=live_node.live)
    urls: list[str] = []
    refused: list[str] = []
    page.on("request", lambda req: urls.append(req.url))
    page.on("response", lambda res: refused.append(f"HTTP {res.status} {res.url}")
            if res.status >= 400 else None)
    try:
        page.goto(http.url + "/#token=" + token, wait_until="load")
        page.wait_for_function(
            "() => document.getElementById('node-id').textContent.includes('/')",
            timeout=30_000)
        cam = live_node.cfg.cameras[0].id
        page.wait_for_function(
            """cam => { const img = document.querySelector(`img[data-camera="${cam}"]`);
                        return img && img.naturalWidth > 0
                               && Number(img.dataset.updates) >= 2; }""",
            arg=cam, timeout=30_000)
    finally:
        http.shutdown()
    assert urls
    assert not [u for u in urls if token in u.split("#", 1)[0]]
    assert not refused, refused
