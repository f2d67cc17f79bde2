"""The playground page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import make_model_dir, running_server

from gptkit.batching import Token
from gptkit.completions import Choice
from gptkit.tokenizer import GPT2Tokenizer, Tokenizer

CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium not installed (apt-get install chromium; .ci/run installs it)",
)
DONE = "document.getElementById('status').textContent.includes('done')"


@contextmanager
def playground(tmp_path: Path, stream: str | None = None, **app_options) -> Iterator[Any]:
    """The page, in headless Chromium, served with a tiny model; with `stream`, the page's
    completion requests are answered with that SSE body instead of the model's."""
    sync_api = pytest.importorskip("playwright.sync_api")
    model_dir = make_model_dir(tmp_path / "tiny")
    with running_server(model_dir, **app_options) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            if stream is not None:
                page.route(
                    "**/v1/completions",
                    lambda route: route.fulfill(
                        status=200, content_type="text/event-stream", body=stream.encode()
                    ),
                )
            page.goto(url + "/")
            yield page
        finally:
            browser.close()


def test_playground_streams_tokens_with_alternatives(tmp_path):
    """Guards the browser playground: typing a prompt streams shaded tokens in, and hovering
    a token shows its top alternatives with probabilities."""
    with playground(tmp_path) as page:
        page.fill("#prompt", "hello there")
        page.fill("#max_tokens", "20")
        # Greedy: sampled runs of this random model sometimes drew end-of-text within
        # 2-3 tokens, leaving too few tokens to hover (a flaky test, seen under load).
        page.fill("#temperature", "0")
        page.click("#go")
        page.wait_for_selector("#output .tok")  # the first tokens streamed in
        status = page.locator("#status")
        page.wait_for_function(DONE)
        tokens = page.locator("#output .tok")
        n = int(status.inner_text().split()[1])  # "done: N tokens (reason)"
        # the finish reason survives the [DONE] line (an "error" one would show too)
        assert re.fullmatch(r"done: \d+ tokens \((stop|length)\)", status.inner_text())
        assert n == tokens.count() and 4 <= n <= 20
        shade = tokens.first.evaluate("e => getComputedStyle(e).backgroundColor")
        assert shade.startswith("rgba(230, 80, 60")
        tokens.nth(3).hover()
        tip = page.locator("#tip")
        tip.wait_for(state="visible")
        assert tip.locator("table.alts tr").count() == 5
        assert "%" in tip.inner_text() and "chosen" in tip.inner_text()
        page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert (tmp_path / "playground.png").stat().st_size > 1000


def completion_stream(tokenizer: Tokenizer, text: str) -> str:
    """The server's SSE body for a completion generating `text`, one chunk per token, from
    the server's own `Choice` (held-back bytes, text offsets, per-token strings)."""
    choice = Choice(0, tokenizer, "", [])
    chunks = []
    for token_id in tokenizer.encode(text):
        choice.add(Token(token_id, -0.5, [(token_id, -0.5)]))
        chunks.append(choice.delta())
    choice.finish("length")
    chunks.append(choice.delta())
    lines = []
    for i, (piece, tokens, offsets) in enumerate(chunks):
        final = "length" if i == len(chunks) - 1 else None
        logprobs = choice.logprobs(tokens, offsets)
        chunk = {"text": piece, "index": 0, "logprobs": logprobs, "finish_reason": final}
        lines.append(f"data: {json.dumps({'choices': [chunk]})}\n\n")
    return "".join(lines) + "data: [DONE]\n\n"


def test_playground_shows_characters_split_across_tokens(tmp_path):
    """Guards the page's text: byte-level BPE splits 日本語 over six tokens, each of which
    decodes alone to U+FFFD; the page showed six replacement characters instead of the
    streamed text."""
    tokenizer = GPT2Tokenizer()
    body = completion_stream(tokenizer, "日本語 and —!")
    assert r"\ufffd" in body  # the tokens' own strings are split characters
    with playground(tmp_path, body) as page:
        page.fill("#prompt", "say: ")
        page.click("#go")
        page.wait_for_function(DONE)
        assert page.locator("#output").inner_text() == "say: 日本語 and —!"
        spans = page.locator("#output .tok")
        assert spans.count() == len(tokenizer.encode("日本語 and —!"))
        assert all("\ufffd" not in s for s in spans.all_inner_texts())


def test_playground_sends_the_api_key(tmp_path):
    """Guards the page leaving out the Authorization header: against a server started with
    an API key, a run without the key shows the server's 401 and one with the key typed
    into the API key field streams tokens."""
    settled = "/^(done|error|stopped)/.test(document.getElementById('status').textContent)"
    with playground(tmp_path, api_key="open sesame") as page:
        page.fill("#prompt", "hello there")
        page.fill("#max_tokens", "5")
        page.fill("#temperature", "0")
        status = page.locator("#status")
        page.click("#go")
        page.wait_for_function(settled)
        assert status.inner_text().startswith("error 401: missing or wrong API key")
        assert page.locator("#output .tok").count() == 0
        page.fill("#api_key", "open sesame")
        page.click("#go")
        page.wait_for_function(settled)
        assert re.fullmatch(r"done: \d+ tokens \((stop|length)\)", status.inner_text())
        assert page.locator("#output .tok").count() >= 1


def test_playground_tooltip_shows_markup_tokens_as_text(tmp_path):
    """Guards the tooltip's escape(): a BPE token or alternative such as "<b>bold</b>" or
    "<img src=x onerror=...>" is shown as its literal text, not parsed as markup (where the
    image's handler would run script from the model's output)."""
    chosen, other = "<b>bold</b> & co", "<img src=x onerror=window.pwned=1>"
    logprobs = {
        "tokens": [chosen],
        "token_logprobs": [-0.1],
        "top_logprobs": [{chosen: -0.1, other: -2.5}],
        "text_offset": [0],
    }
    chunk = {"text": chosen, "index": 0, "logprobs": logprobs, "finish_reason": "length"}
    body = f"data: {json.dumps({'choices': [chunk]})}\n\ndata: [DONE]\n\n"
    with playground(tmp_path, body) as page:
        page.fill("#prompt", "say: ")
        page.click("#go")
        page.wait_for_function(DONE)
        assert page.locator("#output").inner_text() == "say: " + chosen
        page.locator("#output .tok").hover()
        tip = page.locator("#tip")
        tip.wait_for(state="visible")
        assert tip.locator("b, img").count() == 0  # no element made from a token
        first = tip.locator("div").inner_text()
        assert first.startswith(f"chosen {json.dumps(chosen)}: ")  # as show() quotes it
        cells = tip.locator("table.alts td:first-child").all_inner_texts()
        assert cells == [json.dumps(chosen), json.dumps(other)]  # most probable first
        assert page.evaluate("window.pwned === undefined")
