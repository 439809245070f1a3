"""`onnxlm serve` against the official `openai` client, on a server each test module starts on a loopback port."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from onnxlm.runtime.decoding import Decoding
from onnxlm.runtime.engine import EngineConfig

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


@contextlib.contextmanager
def running(app):
    """`app` under uvicorn in a thread on a free loopback port; yields its base URL, stops it after."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r"^(\w+) ([0-9.e+-]+)$", text, re.M)}


@pytest.fixture(scope="module")
def served(tiny_artifact):
    from onnxlm.runtime.server import create_app

    config = EngineConfig(slots=4, token_budget=32, max_queue=64, max_context=512, prefix_cache_mb=16)
    with running(create_app(tiny_artifact, config, model_name="tiny")) as url:
        yield url


def greedy_text(art, ids: list[int], n: int) -> str:
    eos = art.info.eos_token_ids
    return "".join(art.tokenizer.stream(t for t in art.generate_ids(ids, n, decoding=Decoding()) if t not in eos))


PROMPTS = ["The quick brown fox", "In 2007, version 3", "Language models predict", "def f(x):",
           "Caf\u00e9 cr\u00e8me", "The license was", "jumps over the lazy", "return x * 2"]


def test_models_health_and_metrics(served):
    assert [m.id for m in client(served).models.list()] == ["tiny"]
    assert json.loads(urllib.request.urlopen(f"{served}/health").read()) == {"status": "ok"}
    assert metrics(served)["onnxlm_kv_slots"] == 4


def test_completion_equals_generate(served, tiny_artifact):
    out = client(served).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    ids = tiny_artifact.tokenizer.encode(PROMPTS[0])
    assert out.choices[0].text == greedy_text(tiny_artifact, ids, 12)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens <= 12
    assert out.choices[0].finish_reason in ("stop", "length")


def test_chat_streams_what_generate_gives(served, tiny_artifact):
    stream = client(served).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "fox"}], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tiny_artifact.generate("fox", max_new_tokens=10, decoding=Decoding())
    assert chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_sixteen_concurrent_clients_get_generates_tokens(served, tiny_artifact):
    prompts = [PROMPTS[i % len(PROMPTS)] * (1 + i // len(PROMPTS)) for i in range(16)]
    one = client(served)

    def ask(prompt):
        return one.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, answer in zip(prompts, answers):
        assert answer == greedy_text(tiny_artifact, tiny_artifact.tokenizer.encode(prompt), 20), prompt


def test_seeded_sampling_is_reproducible(served):
    def sample(seed):
        return client(served).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=1.0,
                                                 top_p=0.95, seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_stop_strings_end_the_text(served, tiny_artifact):
    full = client(served).completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[5:7]
    cut = client(served).completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_prefix_cache_hits_give_the_same_tokens(served, tiny_artifact):
    prompt = " ".join(PROMPTS) * 3  # > 2 blocks of 32 tokens
    before = metrics(served).get("onnxlm_prefix_cache_hit_tokens_total", 0.0)
    first = client(served).completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    second = client(served).completions.create(model="tiny", prompt=prompt + " and", max_tokens=16, temperature=0)
    assert metrics(served)["onnxlm_prefix_cache_hit_tokens_total"] - before >= 64
    ids = tiny_artifact.tokenizer.encode(prompt)
    assert first.choices[0].text == greedy_text(tiny_artifact, ids, 16)
    assert second.choices[0].text == greedy_text(tiny_artifact, tiny_artifact.tokenizer.encode(prompt + " and"), 16)


def test_a_client_that_disconnects_frees_its_slot(served):
    before = metrics(served).get("onnxlm_requests_cancelled_total", 0.0)
    stream = client(served).completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=400, temperature=0,
                                               stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 20
    while metrics(served).get("onnxlm_requests_cancelled_total", 0.0) <= before:
        assert time.time() < deadline, "the cancelled request kept its slot"
        time.sleep(0.05)
    assert metrics(served)["onnxlm_kv_slots_in_use"] == 0


def test_bad_requests_are_400_and_an_unknown_model_404(served):
    one = client(served)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        one.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="exceeds the server's context"):
        one.completions.create(model="tiny", prompt="fox " * 600, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        one.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=5)
    request = urllib.request.Request(f"{served}/v1/completions", data=b'{"model": "tiny"', method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request)
    assert info.value.code == 400 and "error" in json.loads(info.value.read())


def test_a_full_queue_is_429_with_retry_after(tiny_artifact):
    from onnxlm.runtime.server import create_app

    app = create_app(tiny_artifact, EngineConfig(slots=1, token_budget=None, max_queue=1, max_context=256), "tiny")
    engine = app.state.engine
    gate = threading.Event()
    iteration = engine.batch.iteration
    engine.batch.iteration = lambda: gate.wait(30) and iteration()  # the engine holds its first request
    with running(app) as url:
        one = client(url)
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(one.completions.create, model="tiny", prompt=p, max_tokens=4, temperature=0)
                    for p in PROMPTS[:2]]
            deadline = time.time() + 20
            while engine.queue_depth() < 1 or engine.slots_in_use() < 1:
                assert time.time() < deadline
                time.sleep(0.02)
            response = one.completions.with_raw_response
            with pytest.raises(openai.RateLimitError) as info:
                response.create(model="tiny", prompt="hi", max_tokens=4)
            assert info.value.response.headers["retry-after"] == "1"
            gate.set()
            assert all(h.result().choices[0].text is not None for h in held)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_requests_in_flight(tiny_artifact):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "onnxlm.cli", "serve", str(tiny_artifact.directory), "--port",
                             str(port), "--model-name", "tiny", "--max-context", "512"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "no start"
            time.sleep(0.2)
        stream = client(url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=300, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)  # the request in flight runs to its end
        assert rest and rest[-1].choices[0].finish_reason in ("stop", "length")
        assert proc.wait(60) == 143
        assert "fox" not in proc.stderr.read()  # no prompt text in the log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_python_api_reuses_a_shared_context(tiny_artifact):
    import onnxlm

    art = onnxlm.load(tiny_artifact.directory).reuse_prefixes(16)
    context = " ".join(PROMPTS) * 3
    for question in ("Who?", "What?", "When?"):
        ids = art.prompt_ids(context + question, chat=False)
        assert list(art.generate_ids(ids, 12, decoding=Decoding())) == \
            list(tiny_artifact.generate_ids(ids, 12, decoding=Decoding()))
    assert art.prefix_cache.hits >= 2 * 64  # questions 2 and 3 restored the context's blocks
