"""The chat page at /, in a real headless browser (Debian's chromium driven by playwright): it loads,
a message streams an answer, and a screenshot is kept (`.artifacts/chat-page.png`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moeflash.weights.build import build_tiny
from moeflash.tokenizer import ByteTokenizer

from .server_util import RunningServer

ARTIFACTS = Path(__file__).resolve().parent.parent / ".artifacts"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (test extra) drives the browser")
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium: `make install-test` installs Debian's chromium (apt-get install chromium) as root")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.mark.parametrize("api_key", [None, "sk-page"])
def test_the_page_streams_an_answer(browser, api_key):
    extra = {"api_key": api_key} if api_key else {}
    with RunningServer(build_tiny("float32"), ByteTokenizer(), "tiny", "deepseek_v4", **extra) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        if api_key:
            page.fill("#api_key", api_key)
            page.dispatch_event("#api_key", "change")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'", timeout=20000)
        page.fill("#max_tokens", "24")
        page.fill("#input", "Hello, moeflash!")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60000)
        answer = page.inner_text(".msg.assistant .content")
        meta = page.inner_text(".msg.assistant .meta")
        assert not errors, errors
        assert not page.query_selector(".msg.error"), page.inner_text(".msg.error")
        assert answer.strip() and "prompt tokens" in meta and "generated" in meta
        assert "tok/s" in page.inner_text("#speed") and page.inner_text("#cache").startswith("cache ")
        # a second turn sends the history: the prompt grows
        page.fill("#input", "And again?")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='1']\").length === 2",
                               timeout=60000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"chat-page{'-key' if api_key else ''}.png"))
        page.close()


def test_the_page_says_so_when_the_key_is_wrong(browser):
    with RunningServer(build_tiny("float32"), ByteTokenizer(), "tiny", "deepseek_v4", api_key="right") as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('not connected')",
                               timeout=20000)
        assert "API key" in page.inner_text("#model")
        page.close()


def test_the_page_draws_the_experts_of_a_moe_reply(browser):
    with RunningServer(build_tiny("float32"), ByteTokenizer(), "tiny", "deepseek_v4") as server:
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'", timeout=20000)
        page.check("#experts")
        page.fill("#max_tokens", "12")
        page.fill("#input", "Which experts?")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60000)
        assert page.is_visible("#expert_map")
        size = page.evaluate("[document.getElementById('expert_map').width, document.getElementById('expert_map').height]")
        assert size[1] == 4 and 1 <= size[0] <= 8  # tiny: 4 MoE layers, 8 experts
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat-page-experts.png"))
        page.close()
