"""`selfforcing serve` end to end in a real headless browser (Debian's Chromium, driven by Playwright).

The test runs the real command on a free port, opens the page, starts a stream, checks that frames
arrive and the readout fills in, switches the prompt, and takes a screenshot (kept as
``docs/interactive_page.png`` when ``SELFFORCING_SCREENSHOT`` names that path). In CI (``CI`` set)
a missing browser fails the test instead of skipping it; ``.ci/run`` installs it.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    port = free_port()
    cmd = [sys.executable, "-m", "selfforcing", "serve", "--checkpoint", "sf_dmd_frame_toy", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(f"selfforcing serve exited: {proc.stdout.read()}") from None
                time.sleep(0.1)
        else:
            raise AssertionError("selfforcing serve did not come up within 30 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_page_streams_switches_and_shows_the_readout(server, tmp_path):
    if CHROMIUM is None or not _has_playwright():
        if os.environ.get("CI"):
            pytest.fail("the browser test needs Chromium (apt-get install chromium) and playwright in CI")
        pytest.skip("no Chromium or playwright on this machine")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server)
        page.fill("#prompt", "a large red circle moving right")
        page.click("#start")
        expect(page.locator("#status")).to_contain_text("streaming 24x24", timeout=30_000)
        page.wait_for_function("Number(document.getElementById('frames').textContent) >= 4", timeout=30_000)
        expect(page.locator("#latency")).to_contain_text("ms")
        assert float(page.text_content("#fps")) > 0
        expect(page.locator("#in-effect")).to_have_text("a large red circle moving right")
        page.fill("#switch-prompt", "a large blue square moving left")
        page.click("#switch")
        expect(page.locator("#in-effect")).to_have_text("a large blue square moving left", timeout=30_000)
        expect(page.locator("#status")).to_contain_text("switched to")
        page.wait_for_timeout(1500)  # a second of the new prompt on the canvas
        shot = Path(os.environ.get("SELFFORCING_SCREENSHOT") or tmp_path / "page.png")
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 1000
        page.fill("#switch-prompt", "a purple hexagon")  # a bad switch: an error on the page, the stream goes on
        page.click("#switch")
        expect(page.locator("#status")).to_contain_text("outside the vocabulary", timeout=30_000)
        frames = int(page.text_content("#frames"))
        page.wait_for_function(f"Number(document.getElementById('frames').textContent) > {frames}", timeout=30_000)
        page.click("#stop")
        expect(page.locator("#status")).to_contain_text("stopped", timeout=30_000)
        browser.close()


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_page_streams_video_to_video_from_the_camera(server):
    """Chromium's fake camera (a moving test pattern): the page sends its frames, and the stream runs on them."""
    if CHROMIUM is None or not _has_playwright():
        if os.environ.get("CI"):
            pytest.fail("the browser test needs Chromium (apt-get install chromium) and playwright in CI")
        pytest.skip("no Chromium or playwright on this machine")
    from playwright.sync_api import expect, sync_playwright

    fake_camera = ["--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=fake_camera)
        page = browser.new_page()
        page.goto(server)
        page.check("#camera")
        page.fill("#strength", "0.6")
        page.click("#start")
        expect(page.locator("#status")).to_contain_text("from the camera", timeout=30_000)
        page.wait_for_function("Number(document.getElementById('frames').textContent) >= 4", timeout=30_000)
        assert int(page.text_content("#camera-sent")) > 0
        page.click("#stop")
        expect(page.locator("#status")).to_contain_text("stopped", timeout=30_000)
        browser.close()
