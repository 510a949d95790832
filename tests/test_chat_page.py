"""The chat page at `/`, end to end in headless Chromium (Debian's, driven by Playwright): a question typed in
gets a streamed answer with a collapsible thinking block; the conversation is kept; errors are shown."""

from __future__ import annotations

import os
import shutil

import pytest
from serve_util import ServeProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (bash .ci/run installs it)", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def server(memorised_dir):
    with ServeProcess(memorised_dir) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def test_chat_page_streams_the_answer_with_a_collapsible_thinking_block(server, browser, tmp_path):
    page = browser.new_page()
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_contain_text("tiny-r1")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "30")
    page.fill("#input", "What is 2+3?")
    page.click("#send")
    answer = page.locator(".assistant .answer").last
    expect(answer).to_have_text("5", timeout=30_000)
    think = page.locator(".assistant details.think").last
    expect(think).to_be_visible()
    expect(think).to_contain_text("2+3=5")
    assert "<think>" not in page.inner_text("#log")
    assert think.evaluate("d => d.open") is False  # folded once the answer started
    think.locator("summary").click()
    assert think.evaluate("d => d.open") is True
    expect(page.locator("#send")).to_be_enabled()
    # the conversation is kept: a second question gets its own answer below the first
    page.fill("#input", "What is 4*2?")
    page.keyboard.press("Enter")
    expect(page.locator(".assistant .answer")).to_have_count(2)
    expect(page.locator(".user")).to_have_count(2)
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 1000


def test_chat_page_shows_server_errors(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_contain_text("tiny-r1")
    page.fill("#max_tokens", "100000")  # beyond the 128-token context: the server's 400 is shown
    page.fill("#input", "What is 2+3?")
    page.click("#send")
    expect(page.locator(".msg.error")).to_contain_text("context holds 128")
    expect(page.locator("#send")).to_be_enabled()


def test_chat_page_thinking_toggle_asks_for_no_thinking(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_contain_text("tiny-r1")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "8")
    page.uncheck("#thinking")
    page.fill("#input", "What is 2+3?")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#send")
    assert sent.value.post_data_json["chat_template_kwargs"] == {"thinking": False}
    expect(page.locator("#send")).to_be_enabled(timeout=30_000)
    expect(page.locator(".assistant details.think").last).to_be_hidden()
