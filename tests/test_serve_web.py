"""The web chat page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; nothing is
downloaded): streaming, history, system prompt, controls, the stop button, and model output that tries to
inject HTML or script is shown as text and never runs."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer
from test_serve_support import scripted_llm

CHROMIUM = "/usr/bin/chromium"
KEY = "page-key"
SCRIPT = ("Here you go:\n```html\n<script>window.__pwned = 1</script>\n<img src=x onerror=\"window.__pwned = 2\">\n"
          "```\nInline `<b>bold</b>` and raw <script>window.__pwned = 3</script><img src=y onerror=\"window.__pwned"
          " = 4\"> end.")

playwright_api = pytest.importorskip("playwright.sync_api")
if not os.path.exists(CHROMIUM):  # `make test` installs it with apt
    message = f"{CHROMIUM} is missing: apt-get install -y chromium (make test does this)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


@pytest.fixture(scope="module")
def llm():
    return scripted_llm(SCRIPT, delay=0.002)


@pytest.fixture(scope="module")
def server(llm):
    with BackgroundServer(create_app(llm, api_key=KEY, max_batch=2)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    # The browser logs in the way a person would: HTTP Basic, any user name, the API key as password.
    context = browser.new_context(http_credentials={"username": "me", "password": KEY})
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda exc: page.problems.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and page.problems.append(msg.text))
    page.chat_requests = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and page.chat_requests.append(
        r.post_data_json))
    page.goto(server + "/")
    wait_until(page, "document.getElementById('model').textContent === 'scripted'")
    yield page
    context.close()


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_reply(page):
    return page.locator(".message.assistant").last


def wait_until(page, predicate: str, timeout: float = 30) -> None:
    """Poll a JavaScript predicate from Python until it is true. Playwright's own polling runs inside the
    page with ``eval``, which the server's Content-Security-Policy forbids: it failed whenever the predicate
    was not already true at its first check (a timing-dependent error)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(0.01)


def wait_done(page) -> None:
    page.wait_for_selector(".message.assistant:last-child[data-done='true']", timeout=30_000)


def test_reply_streams_in_and_injected_html_stays_text(page, llm):
    llm.model.delay = 0.02  # slow enough to watch it arrive piece by piece
    send(page, "Show me some HTML")
    # Part of the reply is on the page while it is still streaming.
    wait_until(page, """() => {
        const m = [...document.querySelectorAll('.message.assistant')].pop();
        return m && m.classList.contains('streaming') && m.textContent.includes('Here you go');
    }""")
    assert "end." not in last_reply(page).text_content()
    llm.model.delay = 0.002
    wait_done(page)
    reply = last_reply(page)
    assert reply.locator("pre code").text_content() == (
        '<script>window.__pwned = 1</script>\n<img src=x onerror="window.__pwned = 2">\n')
    assert reply.locator("pre .lang").text_content() == "html"
    assert reply.locator(".text code").text_content() == "<b>bold</b>"
    assert "raw <script>window.__pwned = 3</script><img src=y onerror" in reply.text_content()
    # Nothing was parsed as HTML, so nothing ran.
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#status").text_content().startswith(f"{len(SCRIPT.encode()) + 1} tokens")
    assert page.problems == []


def test_history_system_prompt_and_controls_are_sent(page):
    page.fill("#system", "You are terse.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "5")
    send(page, "first question")
    wait_done(page)
    assert last_reply(page).locator(".content").text_content() == SCRIPT[:5]  # cut at 5 tokens
    assert page.locator("#status").text_content() == "5 tokens (length)"
    send(page, "second question")
    wait_done(page)
    first, second = page.chat_requests
    assert first["temperature"] == 0 and first["max_tokens"] == 5 and first["stream"] is True
    assert second["messages"] == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "first question"},
        {"role": "assistant", "content": SCRIPT[:5]}, {"role": "user", "content": "second question"}]
    assert page.locator(".message.user").all_text_contents() == ["userfirst question", "usersecond question"]
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    send(page, "fresh start")
    wait_done(page)
    assert page.chat_requests[-1]["messages"] == [{"role": "system", "content": "You are terse."},
                                                  {"role": "user", "content": "fresh start"}]
    assert page.problems == []


def test_stop_button_ends_the_reply_and_frees_the_server(page, llm, server):
    llm.model.delay = 0.05
    try:
        send(page, "talk for a while")
        wait_until(page, """() => {
            const m = [...document.querySelectorAll('.message.assistant')].pop();
            return m && m.textContent.length > 30;
        }""")
        assert page.locator("#stop").is_enabled() and page.locator("#send").is_disabled()
        page.click("#stop")
        wait_done(page)
        assert page.locator("#status").text_content() == "stopped"
        partial = last_reply(page).locator(".content").text_content()
        assert 0 < len(partial) < len(SCRIPT) - 20
        deadline = time.monotonic() + 20
        while httpx.get(server + "/health").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(server + "/health").json()["active"] == 0  # the server stopped generating
        assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
    finally:
        llm.model.delay = 0.002
