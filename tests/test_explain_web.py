"""The chat page's "why this token" view (headless Chromium, as tests/test_serve_web.py drives it): each token of
a reply opens a popover with the alternatives the model weighed, the same top_logprobs the API returns."""

from __future__ import annotations

import math
import os
import time

import httpx
import pytest

from conftest import tiny_llm
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer

CHROMIUM = "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api")
if not os.path.exists(CHROMIUM):  # `make test` installs it with apt
    message = f"{CHROMIUM} is missing: apt-get install -y chromium (make test does this)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def label(token: str) -> str:
    return token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def percent(logprob: float) -> str:
    p = math.exp(logprob)
    return f"{100 * p:.{3 if p < 0.001 else 1}f}%"


def test_why_this_token_popover_shows_the_apis_top_logprobs():
    llm = tiny_llm(seed=11)
    with BackgroundServer(create_app(llm, max_batch=2)) as url, playwright_api.sync_playwright() as p:
        expected = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "temperature": 0,
            "max_tokens": 6, "logprobs": True, "top_logprobs": 5}).json()["choices"][0]["logprobs"]["content"]
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        problems = []
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(url + "/")
        deadline = time.monotonic() + 30
        while page.evaluate("document.getElementById('model').textContent") != "tiny-llama":
            assert time.monotonic() < deadline, "the page never reached the model"
            time.sleep(0.02)
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "6")
        page.fill("#prompt", "hello")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".message.assistant[data-done='true']", timeout=30_000)
        reply = page.locator(".message.assistant").last
        reply.locator("button.why").click()
        tokens = reply.locator(".token-view .token")
        assert tokens.count() == len(expected) == 6
        for k in (0, 3):
            tokens.nth(k).click()
            pop = page.locator(".token-popover")
            assert pop.count() == 1
            assert pop.locator(".chosen").text_content() == f"chosen: {label(expected[k]['token'])}  " \
                                                            f"{percent(expected[k]['logprob'])}"
            rows = [(li.locator(".alt").text_content(), li.locator(".prob").text_content())
                    for li in pop.locator("li").all()]
            assert rows == [(label(t["token"]), percent(t["logprob"])) for t in expected[k]["top_logprobs"]]
        page.keyboard.press("Escape")
        assert page.locator(".token-popover").count() == 0
        reply.locator("button.why").click()  # back to the text
        assert reply.locator(".content").is_visible() and not reply.locator(".token-view").is_visible()
        browser.close()
    assert problems == []
