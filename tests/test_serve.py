"""``scaleformer serve``: the OpenAI-compatible server, started as a user starts it (a process of its own on
127.0.0.1) and called with the official ``openai`` client: streamed and whole answers agree, concurrent
requests get what sequential ones get, a load test loses nothing, each kind of bad request gets its error,
a full queue 429, a slow request 504, and SIGTERM lets the requests in flight finish.

The checkpoint is a small hybrid (retention + attention) in float64, so a row batched with others chooses
exactly the tokens it chooses alone (no float32 near-tie can flip)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

import scaleformer as sf
from scaleformer.data.tokenizer import ByteTokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = sf.ModelConfig(vocab_size=259, embed_dim=32, position=sf.RoPE(),
                         layers=tuple(sf.LayerConfig(mixer=m, ffn=sf.MLP(ffn_dim=64))
                                      for m in (sf.Retention(heads=2), sf.Attention(heads=2))))
    directory = tmp_path_factory.mktemp("served") / "tiny"
    sf.save(sf.build(cfg).double(), directory)
    ByteTokenizer().save(directory)
    return directory


class Server:
    """``scaleformer serve`` in a process of its own, on a port the system chose."""

    def __init__(self, checkpoint, *flags: str):
        self.process = subprocess.Popen([sys.executable, "-m", "scaleformer", "serve", str(checkpoint), "--port", "0",
                                         *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, f"the server did not start: {line}{self.process.stdout.read() if self.process.poll() else ''}"
        self.url = f"http://127.0.0.1:{match.group(1)}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def post(self, body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(checkpoint):
    running = Server(checkpoint, "--max-batch", "4")
    yield running
    running.close()


def complete(client, prompt, **options):
    response = client.completions.create(model="tiny", prompt=prompt, **options)
    return response.choices[0].text, response.choices[0].finish_reason


def test_models_and_health(server):
    assert [model.id for model in server.client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_streamed_and_whole_answers_are_the_same_text(server):
    for options in (dict(temperature=0), dict(temperature=1.0, seed=7), dict(temperature=0.8, top_p=0.9, seed=3)):
        whole, reason = complete(server.client, "The cat", max_tokens=24, **options)
        pieces, reasons = [], []
        for chunk in server.client.completions.create(model="tiny", prompt="The cat", max_tokens=24, stream=True,
                                                      **options):
            for choice in chunk.choices:
                pieces.append(choice.text)
                reasons.append(choice.finish_reason)
        assert "".join(pieces) == whole and reasons[-1] == reason == "length"
        assert len(pieces) > 1  # it was streamed, not sent at the end


def test_the_server_generates_what_generate_gives(server, checkpoint):
    model = sf.load(checkpoint)
    ids = ByteTokenizer().encode("Once upon", add_bos=True)
    expected = sf.generate(model, torch.tensor([ids]), 20, stop_tokens=None)[0, len(ids):].tolist()
    text, _ = complete(server.client, "Once upon", max_tokens=20, temperature=0)
    assert text == ByteTokenizer().decode(expected)


def test_concurrent_requests_get_what_sequential_ones_get(server):
    prompts = [(f"prompt number {i}" * (1 + i % 3), dict(temperature=(i % 3) * 0.5, seed=i, max_tokens=8 + i))
               for i in range(10)]
    sequential = [complete(server.client, prompt, **options) for prompt, options in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        concurrent_ = list(pool.map(lambda args: complete(server.client, args[0], **args[1]), prompts))
    assert concurrent_ == sequential


def test_a_load_test_loses_nothing(server):
    count = 48
    def one(i):
        response = server.client.completions.create(model="tiny", prompt=f"request {i}", max_tokens=6 + i % 5,
                                                    temperature=0)
        return response.usage.completion_tokens, response.choices[0].finish_reason
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(count)))
    assert results == [(6 + i % 5, "length") for i in range(count)]


def test_a_list_of_prompts_gets_a_choice_each(server):
    response = server.client.completions.create(model="tiny", prompt=["a b", "c d e"], max_tokens=5, temperature=0)
    assert [choice.index for choice in response.choices] == [0, 1]
    assert [choice.text for choice in response.choices] == [complete(server.client, p, max_tokens=5, temperature=0)[0]
                                                             for p in ("a b", "c d e")]
    assert response.usage.prompt_tokens == 4 + 6  # BOS and the bytes of each


def test_stop_strings_end_the_text_before_them(server):
    text, _ = complete(server.client, "x", max_tokens=40, temperature=0)
    stop = text[10:12]
    cut = text[:text.index(stop)]
    assert complete(server.client, "x", max_tokens=40, temperature=0, stop=[stop]) == (cut, "stop")
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model="tiny", prompt="x", max_tokens=40, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_a_shared_prefix_is_reused_and_changes_nothing(server, checkpoint):
    shared = "A long shared system prompt that many requests begin with. "  # 59 bytes and BOS
    first = server.client.completions.create(model="tiny", prompt=shared + "First?", max_tokens=8, temperature=0)
    second = server.client.completions.create(model="tiny", prompt=shared + "Second?", max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 32  # the states are kept every 32 tokens
    ids = torch.tensor([ByteTokenizer().encode(shared + "Second?", add_bos=True)])
    alone = sf.generate(sf.load(checkpoint), ids, 8, stop_tokens=None)[0, ids.shape[1]:]
    assert second.choices[0].text == ByteTokenizer().decode(alone.tolist())


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"prompt": "a"}', 400, "model is required"),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": 100000000}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": -1}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "a", "temperature": "hot"}', 400, "temperature"),
    (b'{"model": "tiny", "prompt": "a", "top_p": 0}', 400, "top_p"),
    (b'{"model": "tiny", "prompt": 7}', 400, "prompt must be"),
    (b'{"model": "tiny", "prompt": [300]}', 400, "token ids"),
    (b'{"model": "tiny", "prompt": "a", "n": 2}', 400, "n > 1"),
    (b'{"model": "tiny", "prompt": "a", "logprobs": 3}', 400, "logprobs"),
    (b'{"model": "gpt-9", "prompt": "a"}', 404, "does not exist"),
])
def test_bad_requests_get_a_json_error(server, body, status, words):
    code, answer = server.post(body)
    assert code == status and words in answer["error"]["message"], answer
    assert complete(server.client, "still alive", max_tokens=2, temperature=0)[1] == "length"


def test_the_client_sees_each_error_as_its_exception(server):
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-9", prompt="a")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.completions.create(model="tiny", prompt="a", max_tokens=10**8)


def test_a_full_queue_gets_429_and_a_slow_request_504(checkpoint):
    slow = Server(checkpoint, "--max-batch", "1", "--max-queue", "1", "--timeout", "3")
    try:
        def one(_):
            try:
                complete(slow.client, "tick", max_tokens=400, temperature=0)
                return "ok"
            except openai.RateLimitError:
                return 429
            except openai.APIStatusError as error:
                return error.status_code
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(one, range(6)))
        assert outcomes.count(429) >= 1 and set(outcomes) <= {"ok", 429, 504}, outcomes
        code, answer = slow.post(json.dumps({"model": "tiny", "prompt": "z", "max_tokens": 4000,
                                             "temperature": 0}).encode())
        assert code == 504 and "longer than" in answer["error"]["message"]
        assert complete(slow.client, "after", max_tokens=3, temperature=0)[1] == "length"  # and it serves on
    finally:
        slow.close()


def test_sigterm_finishes_the_requests_in_flight(checkpoint):
    stopping = Server(checkpoint)
    stream = stopping.client.completions.create(model="tiny", prompt="go", max_tokens=300, temperature=0,
                                                stream=True)
    chunks = iter(stream)
    first = next(chunks)
    stopping.process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    reasons = [c.choices[0].finish_reason for c in [first, *rest] if c.choices]
    assert reasons[-1] == "length" and rest[-1].usage.completion_tokens == 300  # the stream ran to its end
    stopping.process.wait(timeout=30)
    assert stopping.process.returncode == 0
    assert "every request in flight finished" in stopping.process.stdout.read()
    with pytest.raises(openai.APIConnectionError):  # and it takes no new connection
        stopping.client.models.list()


def test_a_client_that_leaves_a_stream_frees_its_row(server):
    import http.client

    port = int(server.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "long", "max_tokens": 4000,
                                                              "stream": True, "temperature": 0}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    health = lambda: json.loads(urllib.request.urlopen(server.url + "/health", timeout=10).read())  # noqa: E731
    assert health()["running"] == 1
    connection.close()  # gone without reading on
    deadline = time.monotonic() + 20
    while health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health()["running"] == 0



def test_a_draining_service_answers_503_and_a_full_queue_429(checkpoint):
    """The two refusals of ``Service.submit`` on their own: after SIGTERM (draining) and past --max-queue."""
    import asyncio

    from scaleformer.engine import Engine, SamplingOptions
    from scaleformer.serve import ServeError, Service

    service = Service(Engine(sf.load(checkpoint)), ByteTokenizer(), "tiny", max_queue=1)

    async def submit(prompts):
        return service.submit(prompts, SamplingOptions(max_new_tokens=2), asyncio.Queue())

    service.draining = True
    with pytest.raises(ServeError) as refused:
        asyncio.run(submit([[1, 2]]))
    assert refused.value.status == 503 and refused.value.body()["error"]["code"] == "shutting_down"
    service.draining = False
    with pytest.raises(ServeError) as full:
        asyncio.run(submit([[1, 2], [3, 4]]))  # two prompts, room for one: neither is queued
    assert full.value.status == 429 and not service.engine.waiting
    asyncio.run(submit([[1, 2]]))
    assert len(service.engine.waiting) == 1
