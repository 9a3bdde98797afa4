"""The chat page in a real browser: Debian's chromium driven headless by Playwright, against the real server.

Skipped when chromium is absent, unless env CI is set (then it fails: .ci/run installs chromium).
`NANOCHAT_UPDATE_SCREENSHOT=1` also writes the screenshot to docs/chat_ui.png (the README's picture).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.chat_fixtures import EMOJI_REPLY, REPO_ROOT, chat_base_dir, shared_server

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing on CI: .ci/run installs it with apt (chromium)")
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium to run the browser tests")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return chat_base_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def server(base):
    return shared_server(base, "sft")  # 2 workers, temperature 0 by default


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 640})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors


def assistant_texts(page) -> list[str]:
    return page.locator(".msg.assistant.done").evaluate_all("els => els.map(e => e.firstChild.textContent)")


def send(page, text: str, n_replies: int) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    expect(page.locator(".msg.assistant.done")).to_have_count(n_replies, timeout=30000)
    expect(page.locator(".msg.assistant.streaming")).to_have_count(0)


def test_sse_parser_of_the_page_handles_split_events_and_characters(server, page):
    page.goto(server.url + "/")
    event = 'data: {"content": "caf\u00e9 \U0001F600"}\n\n'
    results = page.evaluate("""(event) => {
        const bytes = new TextEncoder().encode(event + "data: [DONE]\\n\\n");
        const out = [];
        for (let cut = 1; cut < bytes.length; cut++) {  // every split point, inside the emoji too
            const got = [];
            const p = window.nanochat.createSSEParser(d => got.push(d));
            p.push(bytes.slice(0, cut)); p.push(bytes.slice(cut)); p.end();
            out.push(got);
        }
        const got = [];  // one byte per chunk
        const p = window.nanochat.createSSEParser(d => got.push(d));
        for (const b of bytes) p.push(new Uint8Array([b]));
        out.push(got);
        return out;
    }""", event)
    assert len(results) > 30
    for got in results:
        assert got == [json.dumps({"content": "caf\u00e9 \U0001F600"}, ensure_ascii=False), "[DONE]"]


def test_chat_in_the_browser(server, page, tmp_path):
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_contain_text("nanochat-sft-tiny-1")
    expect(page.locator("#temperature")).to_have_value("0")  # the server's -t default
    # Shift+Enter is a new line, not a send
    page.click("#input")
    page.keyboard.type("a")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("b")
    assert page.input_value("#input") == "a\nb" and page.locator(".msg").count() == 0
    page.fill("#input", "")
    # Enter sends; the assistant bubble fills within 30 s
    send(page, "hi", 1)
    assert assistant_texts(page) == [EMOJI_REPLY]
    assert page.locator(".msg.user .text").all_text_contents() == ["hi"]
    # a calculator call is shown as a tool call, not as raw text
    send(page, "What is 12 times 3?", 2)
    tool = page.locator(".msg.assistant.done").nth(1).locator(".tool")
    assert tool.locator(".call").text_content() == "12*3" and tool.locator(".out").text_content() == "36"
    assert "<<" not in page.locator(".msg.assistant.done").nth(1).text_content()
    shot = tmp_path / "chat_ui.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("NANOCHAT_UPDATE_SCREENSHOT"):
        shutil.copy(shot, REPO_ROOT / "docs" / "chat_ui.png")
    # regenerate the last reply: replaced, not added
    page.click(".regenerate")
    expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=30000)
    expect(page.locator(".msg.assistant.done")).to_have_count(2)
    assert page.locator(".msg.assistant.done .tool .out").last.text_content() == "36"
    # edit the first user message: the conversation is cut there and answered again
    page.locator(".msg.user .edit").first.click()
    page.fill(".msg.user textarea", "What is 12 times 3?")
    page.click(".msg.user .save")
    expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=30000)
    expect(page.locator(".msg.assistant.done")).to_have_count(1)
    assert page.locator(".msg.user .text").all_text_contents() == ["What is 12 times 3?"]
    assert page.locator(".msg.assistant.done .tool .out").text_content() == "36"
    # new chat clears
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator(".empty").is_visible()
    # the page's settings go into the request
    page.fill("#max-tokens", "3")
    send(page, "hi", 1)
    short = assistant_texts(page)[0]
    assert short and EMOJI_REPLY.startswith(short) and short != EMOJI_REPLY


def test_stop_button_ends_a_long_reply(base, page):
    s = shared_server(base, "long")
    before = httpx.get(s.url + "/stats").json()
    page.goto(s.url + "/")
    expect(page.locator("#max-tokens")).to_have_value("512")  # the server's default, then ours
    page.fill("#max-tokens", "4000")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    expect(page.locator(".msg.assistant.streaming")).to_have_text(re.compile(r"[\s\S]{10,}"), timeout=30000)
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.click("#stop")
    expect(page.locator(".msg.assistant.done")).to_have_count(1, timeout=10000)
    assert page.is_visible("#send")
    deadline = time.time() + 10
    while httpx.get(s.url + "/health").json()["workers"]["busy"] and time.time() < deadline:
        page.wait_for_timeout(100)
    stats = httpx.get(s.url + "/stats").json()
    assert stats["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
    assert stats["tokens_generated"] - before["tokens_generated"] < 2000
