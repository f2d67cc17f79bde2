"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

import httpx
import openai
import pytest
import torch
from serve_helpers import make_model_dir, metric, running_server

from gptkit import batching, cli
from gptkit.batching import Finished, SamplingParams, Scheduler, Sequence, Token
from gptkit.checkpoint import load
from gptkit.completions import Choice
from gptkit.generate import sample_next, stream_text
from gptkit.model import KV_CACHE_DTYPES
from gptkit.tokenizer import CharTokenizer

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve") / "tiny", context_length=512)


@pytest.fixture(scope="module")
def url(model_dir):
    torch.set_num_threads(1)
    with running_server(model_dir, max_batch=32, max_queue=64) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The `gptkit sample` path (stream_text with a seed), for comparison."""
    model, tok = load(model_dir)

    def text(prompt: str, seed: int, n: int = MAX_TOKENS, **sampling) -> str:
        return "".join(stream_text(model, tok, prompt, n, seed=seed, **sampling))

    return text


def test_models_and_completion(client, model_dir):
    """Guards the basic OpenAI round trip: model listing, text, usage and finish reason."""
    assert [m.id for m in client.models.list().data] == [model_dir.name]
    out = client.completions.create(
        model=model_dir.name, prompt="hello", max_tokens=MAX_TOKENS, temperature=0
    )
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.index == 0
    assert choice.finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == 5
    assert out.usage.completion_tokens == len(choice.text)  # one char per token
    if choice.finish_reason == "length":
        assert len(choice.text) == MAX_TOKENS


def test_seeded_completion_equals_gptkit_sample(client, model_dir, capsys):
    """Guards determinism: with a seed and n=1 the server's text is exactly what
    `gptkit sample` prints for the same seed and sampling settings (temperature 0 too)."""
    for temperature, top_k, top_p in [(0.9, 10, 0.95), (1.3, None, None), (0.0, None, None)]:
        args = ["sample", str(model_dir), "--prompt", "the ", "--seed", "7"]
        args += ["--max-new-tokens", str(MAX_TOKENS), "--temperature", str(temperature)]
        args += ["--top-k", str(top_k)] if top_k is not None else []
        args += ["--top-p", str(top_p)] if top_p is not None else []
        if top_k is None:  # the CLI's default top_k is 200: pass the full vocabulary
            args += ["--top-k", "1000"]
        assert cli.main(args) == 0
        printed = capsys.readouterr().out
        extra = {"top_k": top_k if top_k is not None else 1000}
        out = client.completions.create(
            model=model_dir.name,
            prompt="the ",
            max_tokens=MAX_TOKENS,
            temperature=temperature,
            top_p=top_p,
            seed=7,
            extra_body=extra,
        )
        assert printed == "the " + out.choices[0].text + "\n"


def test_streaming_matches_non_streaming(client, url, model_dir):
    """Guards the SSE path: the chunks join to the non-streamed text, and the raw stream
    ends with `data: [DONE]`."""
    kwargs = dict(model=model_dir.name, prompt="abc", max_tokens=MAX_TOKENS, seed=3)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    body = {"prompt": "abc", "max_tokens": 4, "stream": True}
    raw = httpx.post(f"{url}/v1/completions", json=body).text
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_logprobs_are_the_models(client, model_dir):
    """Guards logprobs: per token the chosen token's log-probability and the top
    alternatives equal log_softmax of the model's logits at that position."""
    out = client.completions.create(
        model=model_dir.name, prompt="ab", max_tokens=8, logprobs=3, seed=1, temperature=1.0
    )
    lp = out.choices[0].logprobs
    text = out.choices[0].text
    assert "".join(lp.tokens) == text and len(lp.top_logprobs) == len(text)
    model, tok = load(model_dir)
    ids = tok.encode("ab" + text)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)  # (T, V)
    for i, token in enumerate(lp.tokens):
        row = ref[1 + i]  # predicts ids[2 + i]
        assert lp.token_logprobs[i] == pytest.approx(float(row[ids[2 + i]]), abs=1e-4)
        top = torch.topk(row, 3)
        pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        expected = {tok.decode([j]): v for j, v in pairs}
        expected[token] = float(row[ids[2 + i]])  # the sampled token is always there
        assert lp.top_logprobs[i] == pytest.approx(expected, abs=1e-4)
        assert lp.text_offset[i] == i  # offsets into the returned text (no echo here)
        assert token == text[i]


def test_echo_with_logprobs_scores_the_prompt(client, url, model_dir):
    """Guards echo: the text starts with the prompt, and with logprobs the prompt's tokens
    come first (the first unscored), scored like the generated ones, streamed or not."""
    kwargs = dict(model=model_dir.name, prompt="abc", max_tokens=4, seed=4, echo=True)
    plain = client.completions.create(**kwargs).choices[0].text
    out = client.completions.create(logprobs=2, **kwargs).choices[0]
    assert out.text == plain and plain.startswith("abc")
    lp = out.logprobs
    assert lp.tokens == list(out.text) and lp.text_offset == list(range(len(out.text)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    model, tok = load(model_dir)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([tok.encode(out.text)]))[0], dim=-1)
    ids = tok.encode(out.text)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
        assert len(lp.top_logprobs[t]) in (2, 3) and lp.tokens[t] in lp.top_logprobs[t]
    chunks = list(client.completions.create(logprobs=2, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == out.text
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks) == len(out.text)


def test_n_choices_and_prompt_lists(client, url, model_dir, reference):
    """Guards n > 1 and list prompts: choice i of a seeded request uses seed + i, prompts
    come in order, and token-id prompts equal their text."""
    out = client.completions.create(model=model_dir.name, prompt="hi", n=3, seed=5)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [reference("hi", 5 + i, 16) for i in range(3)]
    out = client.completions.create(model=model_dir.name, prompt=["ab", "cd"], n=2, seed=0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[2] == reference("cd", 0, 16) and by_index[1] == reference("ab", 1, 16)
    _, tok = load(model_dir)
    ids = client.completions.create(model=model_dir.name, prompt=tok.encode("cd"), seed=0)
    assert ids.choices[0].text == by_index[2]
    tokens = httpx.post(f"{url}/v1/tokenize", json={"prompt": "cd"}).json()
    assert tokens["tokens"] == tok.encode("cd") and tokens["count"] == 2


def test_stop_strings(client, model_dir):
    """Guards stop strings: text ends right before the first stop string, streamed or not,
    with finish_reason "stop" (a stop string split across tokens included)."""
    kwargs = dict(model=model_dir.name, prompt="x", max_tokens=MAX_TOKENS, seed=2)
    full = client.completions.create(**kwargs).choices[0].text
    assert len(full) >= 8, "the tiny model ended early; pick another seed"
    stop = full[5:7]  # two characters: two tokens
    cut = full.index(stop)
    out = client.completions.create(stop=[stop, "@@@"], **kwargs).choices[0]
    assert (out.text, out.finish_reason) == (full[:cut], "stop")
    chunks = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def _stream_choice(text: str, stops: list[str]) -> tuple[list[str], list[list[int]], Choice]:
    """Feed `text` to a Choice one character (one CharTokenizer token) at a time, taking
    its delta after each token as a streaming response does: the text pieces, and the
    text offsets of the tokens each delta handed out."""
    tok = CharTokenizer("abcdx")
    choice = Choice(0, tok, "", stops)
    pieces, offsets = [], []
    for c in text:
        assert choice.finish_reason is None, "fed past a stop"
        choice.add(Token(tok.encode(c)[0], -1.0))
        piece, tokens, offs = choice.delta()
        assert len(tokens) == len(offs)
        pieces.append(piece)
        offsets.append(offs)
    return pieces, offsets, choice


def test_streamed_choice_holds_back_a_possible_stop_string_start():
    """Guards the stop-string hold-back (serve batches events, so its tests rarely see a
    delta taken between two tokens): a text tail that may begin a stop string is not
    streamed until the next token settles it, nor is its token, and finishing for
    another reason flushes both."""
    pieces, offsets, choice = _stream_choice("abxac", ["cd"])
    assert pieces == ["a", "b", "x", "a", ""]  # the "c" that may begin "cd" waits
    assert offsets == [[0], [1], [2], [3], []]
    choice.finish("length")
    text, tokens, offs = choice.delta()
    assert (text, [t.id for t in tokens], offs) == ("c", choice.tokenizer.encode("c"), [4])


def test_streamed_choice_drops_the_tokens_of_a_stop_string():
    """Guards the tokens of a stop string being reported: a b c d with stop "cd" is the
    text "ab" and exactly the tokens a and b, streamed or taken at once."""
    tok = CharTokenizer("abcdx")
    whole = Choice(0, tok, "", ["cd"])
    assert [whole.add(Token(i, -1.0)) for i in tok.encode("abcd")] == [False] * 3 + [True]
    text, tokens, offs = whole.delta()
    assert (text, [t.id for t in tokens], offs) == ("ab", tok.encode("ab"), [0, 1])
    pieces, offsets, choice = _stream_choice("abcd", ["cd"])
    assert choice.finish_reason == "stop"
    assert "".join(pieces) == "ab" and sum(offsets, []) == [0, 1]
    assert choice.delta() == ("", [], [])


def test_streamed_choice_with_a_stop_string_over_three_tokens():
    """Guards the hold-back of a stop string longer than two tokens: its first two
    characters wait while they may still begin it, go out once they cannot, and the
    stop's own tokens are never reported."""
    pieces, offsets, choice = _stream_choice("abcxbcd", ["bcd"])
    assert pieces == ["a", "", "", "bcx", "", "", ""]
    assert offsets == [[0], [], [], [1, 2, 3], [], [], []]
    assert choice.finish_reason == "stop" and choice.text == "abcx"
    assert choice.delta() == ("", [], [])


def test_32_concurrent_streams_are_batched(url, reference):
    """Guards continuous batching: 32 concurrent streaming clients all get their own
    seeded text exactly (so their right token counts), and decode steps ran > 1 rows."""
    before_steps = metric(url, "gptkit_batch_size_count")
    before_single = metric(url, 'gptkit_batch_size_bucket{le="1"}')

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int, str]:
        body = {"prompt": "ab", "max_tokens": MAX_TOKENS, "seed": i, "stream": True}
        body["logprobs"] = 0
        text, tokens, finish = "", 0, None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    tokens += len(choice["logprobs"]["tokens"])
                    finish = choice["finish_reason"] or finish
        return text, tokens, finish

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    for i, (text, tokens, finish) in enumerate(results):
        assert text == reference("ab", i)
        assert tokens == len(text)
        assert finish == ("length" if len(text) == MAX_TOKENS else "stop")
    steps = metric(url, "gptkit_batch_size_count") - before_steps
    single = metric(url, 'gptkit_batch_size_bucket{le="1"}') - before_single
    assert steps - single > 0, "no decode step ran more than one sequence"
    assert metric(url, "gptkit_tokens_generated_total") >= sum(len(r[0]) for r in results)


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (json.dumps({"prompt": 5}).encode(), 400),
        (json.dumps({"prompt": "a", "temperature": "hot"}).encode(), 400),
        (json.dumps({"prompt": "a", "n": "2"}).encode(), 400),
        (json.dumps({"prompt": "a", "stream": "yes"}).encode(), 400),
        (json.dumps({"prompt": "a", "max_tokens": True}).encode(), 400),
        (json.dumps({"prompt": "a", "temperature": -1}).encode(), 400),
        (json.dumps({"prompt": "a", "top_p": -0.1}).encode(), 400),
        (b'{"prompt": "a", "temperature": NaN}', 400),
        (b'{"prompt": "a", "temperature": Infinity}', 400),
        (b'{"prompt": "a", "top_p": NaN}', 400),
        (b"[" * 100_000 + b"]" * 100_000, 400),  # nested past Python's recursion limit
        (json.dumps({"prompt": "a", "top_k": 0}).encode(), 400),
        (json.dumps({"prompt": "a", "n": 1000}).encode(), 400),
        (json.dumps({"prompt": "a", "logprobs": 6}).encode(), 400),
        (json.dumps({"prompt": "a", "max_tokens": -1}).encode(), 400),
        (json.dumps({"prompt": "a", "max_tokens": 512}).encode(), 400),
        (json.dumps({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400),
        (json.dumps({"prompt": [1, 2, 10**6]}).encode(), 400),
        (json.dumps({"prompt": []}).encode(), 400),
        (json.dumps({"prompt": "\u00e9"}).encode(), 400),  # not in the char vocabulary
        (json.dumps({"prompt": "a", "model": "gpt-9"}).encode(), 404),
        (json.dumps({"prompt": "a" * (2 << 20)}).encode(), 413),
    ],
)
def test_bad_requests_get_json_errors(url, body, status):
    """Guards request checking: every bad request gets its 4xx status and OpenAI's error
    shape before any model work, and the server stays healthy (NaN passed range checks,
    deep nesting was a 500)."""
    r = httpx.post(
        f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_temperature_zero_is_greedy(url, model_dir):
    """Guards `x or default`: temperature 0 must mean argmax, not the default 1."""
    body = {"prompt": "ab", "max_tokens": 8, "temperature": 0}
    texts = {
        httpx.post(f"{url}/v1/completions", json={**body, "seed": s}).json()["choices"][0]["text"]
        for s in range(3)
    }
    assert len(texts) == 1


def test_disconnect_frees_the_slot(url):
    """Guards leaked slots: a client that leaves mid-stream stops its decoding within a
    step, and the server answers normally afterwards."""
    before = metric(url, "gptkit_tokens_generated_total")
    body = {"prompt": "a", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    for _ in range(500):
        if metric(url, "gptkit_active_sequences") == 0:
            break
        time.sleep(0.01)
    assert metric(url, "gptkit_active_sequences") == 0
    assert metric(url, "gptkit_tokens_generated_total") - before < 400
    assert httpx.get(f"{url}/health").status_code == 200
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


@contextmanager
def sampling_blocked(monkeypatch) -> Iterator[threading.Event]:
    """Hold the scheduler thread inside its next `sample_next` until the block ends;
    yields an event set once it is held there (a sequence is then being admitted)."""
    held, release = threading.Event(), threading.Event()

    def blocking(*args, **kwargs):
        held.set()
        release.wait(30)
        return sample_next(*args, **kwargs)

    monkeypatch.setattr(batching, "sample_next", blocking)
    try:
        yield held
    finally:
        release.set()
        monkeypatch.setattr(batching, "sample_next", sample_next)


def test_api_key_and_full_queue(model_dir, monkeypatch):
    """Guards auth and overload: with --api-key a missing or wrong key is 401 (health
    stays open); a request that overflows the queue is 429 with Retry-After, one that no
    idle server could hold is 400."""
    with running_server(model_dir, api_key="sekrit", max_batch=1, max_queue=1) as url:
        body = {"prompt": "a", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        r = httpx.post(f"{url}/v1/completions", json=body, headers=wrong)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        assert client.completions.create(model=model_dir.name, prompt="a", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).models.list()
        # idle: one slot and one place in the queue take n=2
        assert client.completions.create(model=model_dir.name, prompt="a", max_tokens=2, n=2)
        with pytest.raises(openai.BadRequestError):  # n=3 never fits: retrying is futile
            client.completions.create(model=model_dir.name, prompt="a", max_tokens=2, n=3)
        with ThreadPoolExecutor(1) as pool, sampling_blocked(monkeypatch) as held:
            first = pool.submit(client.completions.create, model=model_dir.name, prompt="a")
            assert held.wait(30)  # the slot is taken
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=model_dir.name, prompt="a", max_tokens=2, n=2)
        assert e.value.response.headers["retry-after"] == "1"
        assert first.result(timeout=30).choices
        assert httpx.get(f"{url}/health").status_code == 200


def test_max_queue_zero_serves_an_idle_server(model_dir):
    """Guards --max-queue 0 refusing every request (each sequence passes `waiting`): it
    means no waiting beyond the free slots, and more sequences than slots is a 400."""
    with running_server(model_dir, max_batch=2, max_queue=0) as url:
        body = {"prompt": "a", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        assert httpx.post(f"{url}/v1/completions", json={**body, "n": 2}).status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": ["a", "b"], "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_tiny_temperature_and_top_p_are_greedy(url):
    """Guards temperature 1e-40 and top_p 1e-300 passing the checks, then failing every
    sequence in the batch ("cannot sample"): they sample greedily, as top_p 0 does."""
    body = {"prompt": "ab", "max_tokens": 8, "seed": 0}

    def text(**extra) -> str:
        r = httpx.post(f"{url}/v1/completions", json={**body, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = text(temperature=0)
    assert text(temperature=1e-40) == greedy
    assert text(top_p=1e-300) == greedy
    assert text(top_p=0) == greedy


def test_a_failing_sequence_fails_alone(model_dir, reference, monkeypatch):
    """Guards one sequence's failure finishing every sequence in the batch: sampling that
    raises while one sequence is admitted, or for another mid-batch, finishes just that
    one with "error"; the sequence decoding beside them completes as `gptkit sample`."""
    model, tok = load(model_dir)
    at_admission, mid_batch = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    draws = {at_admission: 0, mid_batch: 0}

    def flaky(logits, temperature, top_k, top_p, generator):
        draws[generator] = draws.get(generator, 0) + 1
        # at admission (the first draw), and at mid_batch's second decode step
        if (generator, draws[generator]) in ((at_admission, 1), (mid_batch, 3)):
            raise ValueError("cannot sample: injected")
        return sample_next(logits, temperature, top_k, top_p, generator)

    monkeypatch.setattr(batching, "sample_next", flaky)
    gens = [at_admission, torch.Generator().manual_seed(5), mid_batch]
    events: list[list] = [[] for _ in gens]
    done = [threading.Event() for _ in gens]

    def emit(i: int, ev: Token | Finished) -> None:
        events[i].append(ev)
        if isinstance(ev, Finished):
            done[i].set()

    seqs = [
        Sequence(tok.encode("ab"), SamplingParams(MAX_TOKENS), partial(emit, i), gen)
        for i, gen in enumerate(gens)
    ]
    scheduler = Scheduler(model, tok.eot_id, max_batch=4, max_queue=4)
    scheduler.start()
    try:
        scheduler.submit(seqs)
        assert all(d.wait(30) for d in done)
    finally:
        scheduler.stop()
    error = Finished("error", "ValueError: cannot sample: injected")
    assert events[0] == [error]
    assert [type(ev) for ev in events[2]] == [Token, Token, Finished] and events[2][-1] == error
    healthy = events[1]
    text = tok.decode([ev.id for ev in healthy[:-1]])
    assert text == reference("ab", 5)
    assert healthy[-1] == Finished("length" if len(text) == MAX_TOKENS else "stop")


def test_failed_generation_answers_500(url, monkeypatch):
    """Guards a choice that failed answering 200 with empty text: the non-streamed
    response is a 500 in OpenAI's error shape, counted in /metrics."""

    def broken(*args, **kwargs):
        raise ValueError("cannot sample: injected")

    monkeypatch.setattr(batching, "sample_next", broken)
    try:
        before = metric(url, 'gptkit_requests_total{status="500"}')
    except KeyError:
        before = 0
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 4})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and "cannot sample" in error["message"]
    assert metric(url, 'gptkit_requests_total{status="500"}') == before + 1


def test_a_crash_is_counted_in_metrics(model_dir, monkeypatch):
    """Guards /metrics missing the 500s of unexpected exceptions on /v1/completions."""
    from fastapi.testclient import TestClient

    from gptkit import serve

    def crash(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(serve, "prompt_ids", crash)
    app = serve.create_app(*load(model_dir), model_dir.name)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/completions", json={"prompt": "a"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert 'gptkit_requests_total{status="500"} 1' in client.get("/metrics").text


def test_scoring_a_prompt_with_max_tokens_0(url):
    """Guards echo + logprobs + max_tokens 0 (OpenAI's way to score a prompt) returning
    no logprobs: the prompt's tokens come back scored (the first null), streamed or not."""
    body = {"prompt": "romeo,", "max_tokens": 0, "echo": True, "logprobs": 1}
    choice = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert (choice["text"], choice["finish_reason"]) == (body["prompt"], "length")
    assert lp["tokens"] == list(body["prompt"]) and lp["text_offset"] == list(range(6))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(math.isfinite(x) and x < 0 for x in lp["token_logprobs"][1:])
    raw = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}).text
    chunks = [json.loads(e[6:])["choices"][0] for e in raw.split("\n\n") if "{" in e]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks for x in c["logprobs"][key]] == lp[key]


def test_streamed_logprobs_equal_non_streamed_at_a_stop_string(client, model_dir):
    """Guards streamed logprobs holding the tokens of a stop string (text_offset past the
    text) that the non-streamed response leaves out: the same tokens, exactly."""
    tried = 0
    for seed in range(20):
        kwargs = dict(model=model_dir.name, prompt="x", max_tokens=MAX_TOKENS, seed=seed)
        full = client.completions.create(**kwargs).choices[0].text
        if len(full) < 8:
            continue
        tried += 1
        kwargs.update(stop=full[5:7], logprobs=1)
        whole = client.completions.create(**kwargs).choices[0].logprobs
        tokens, offsets, logprobs = [], [], []
        for chunk in client.completions.create(stream=True, **kwargs):
            lp = chunk.choices[0].logprobs
            tokens, offsets = tokens + lp.tokens, offsets + lp.text_offset
            logprobs += lp.token_logprobs
        assert (tokens, offsets) == (whole.tokens, whole.text_offset), seed
        assert logprobs == whole.token_logprobs
    assert tried >= 10


def test_top_logprobs_always_hold_the_sampled_token(url):
    """Guards logprobs 0 giving empty top_logprobs (OpenAI always includes the sampled
    token, up to logprobs + 1 entries), for echoed prompt tokens too."""
    body = {"prompt": "abc", "max_tokens": 8, "logprobs": 0, "echo": True, "seed": 2}
    lp = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert lp["top_logprobs"][0] is None  # the first prompt token has no logprob
    rows = zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)
    for token, logprob, top in list(rows)[1:]:
        assert top == {token: logprob}


@pytest.mark.parametrize("body", [[], None, "x"])
def test_a_body_that_is_no_object(url, body):
    """Guards the message "None: Input should be a valid dictionary"."""
    r = httpx.post(f"{url}/v1/completions", content=json.dumps(body))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] is None
    assert error["message"].startswith("Input should be a valid dictionary")


def test_error_details(url, client, model_dir):
    """Guards error fields: the request's field as param (not `prompt.str`), a too large
    max_tokens as context_length_exceeded, unknown routes and methods (and model ids) in
    OpenAI's shape, and `client.models.retrieve`."""

    def error(body: dict) -> dict:
        return httpx.post(f"{url}/v1/completions", json=body).json()["error"]

    assert error({"prompt": 5})["param"] == "prompt"
    assert error({"prompt": "a", "stop": 5})["param"] == "stop"
    for max_tokens in (512, 10**6):
        assert error({"prompt": "a", "max_tokens": max_tokens})["code"] == (
            "context_length_exceeded"
        )
    r = httpx.get(f"{url}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["error"]
    assert client.models.retrieve(model_dir.name).id == model_dir.name
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.code == "model_not_found"


@pytest.mark.parametrize(
    "field, value",
    [
        ("logit_bias", {"3": 5}),
        ("best_of", 2),
        ("suffix", "!"),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("stream_options", {"include_usage": True}),
    ],
)
def test_unsupported_fields_are_refused(url, field, value):
    """Guards OpenAI fields we do not implement being silently ignored."""
    body = {"prompt": "a", "max_tokens": 2, "stream": True, field: value}
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert "does not support" in r.json()["error"]["message"]


def test_unsupported_fields_with_default_values_are_accepted(url):
    """Guards refusing requests from clients that send OpenAI's defaults explicitly."""
    body = {"prompt": "a", "max_tokens": 2, "logit_bias": {}, "best_of": 1, "suffix": None}
    body |= {"presence_penalty": 0, "frequency_penalty": 0.0}
    body |= {"stream_options": {"include_usage": False}, "user": "ignored"}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200


def test_api_key_scheme_is_case_insensitive(model_dir, monkeypatch):
    """Guards `bearer KEY` being refused (RFC 7235: the scheme is case-insensitive) and
    the key compared in variable time (hmac.compare_digest)."""
    import hmac

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    with running_server(model_dir, api_key="sekrit") as url:
        body = {"prompt": "a", "max_tokens": 2}
        for header in ("Bearer sekrit", "bearer sekrit", "BEARER  sekrit"):
            r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": header})
            assert r.status_code == 200, header
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "sekrit"})
        assert r.status_code == 401
    assert compared


def test_serve_command_rejects_bad_arguments(tmp_path, capsys):
    """Guards the CLI: a missing model directory or a zero batch is one line and exit 2."""
    assert cli.main(["serve", str(tmp_path / "nope")]) == 2
    assert cli.main(["serve", str(tmp_path), "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("gptkit: error:") for line in err)


@pytest.mark.parametrize(("weights", "kv_cache"), [("bf16", "fp32"), ("int8", "bf16")])
def test_serve_command_serves_small_weights(tmp_path, monkeypatch, weights, kv_cache):
    """Guards `gptkit serve --weights` and `--kv-cache`: the served model holds bf16/int8
    matrices, the scheduler's cache the dtype asked for, and the app answers a completion
    with them."""
    import uvicorn
    from fastapi.testclient import TestClient

    from gptkit.quantize import WeightOnlyLinear

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    model_dir = make_model_dir(tmp_path / "tiny")
    assert cli.main(["serve", str(model_dir), "--weights", weights, "--kv-cache", kv_cache]) == 0
    scheduler = apps[0].state.scheduler
    assert scheduler.cache.k.dtype == KV_CACHE_DTYPES[kv_cache]
    model = scheduler.model
    linears = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    expected = torch.bfloat16 if weights == "bf16" else torch.int8
    assert linears and all(m.weight.dtype == expected for m in linears)
    with TestClient(apps[0]) as client:
        body = {"model": "tiny", "prompt": "ab", "max_tokens": 3, "temperature": 0}
        reply = client.post("/v1/completions", json=body)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
