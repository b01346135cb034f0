"""``scaleformer serve CHECKPOINT``: an OpenAI-compatible HTTP server over the continuous-batching engine.

Endpoints: ``POST /v1/completions`` (streamed as server-sent events, or whole), ``GET /v1/models``,
``GET /health``. Concurrent requests share the :class:`~scaleformer.engine.Engine`'s batch, which one
thread steps; prompts resume from the longest cached prefix (:class:`~scaleformer.engine.PrefixCache`).
What a client gets wrong is a 4xx JSON error in OpenAI's shape (``{"error": {"message", "type", "param",
"code"}}``), never a crash: malformed JSON or fields 400, an unknown model 404, a full queue 429; a request
past its time limit 504; during shutdown 503. SIGTERM stops accepting connections and lets the requests
in flight finish. Needs the ``serve`` extra: ``pip install "scaleformer[serve]"``.
"""


import asyncio
import contextlib
import json
import logging
import math
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence


from scaleformer.engine import Engine, PrefixCache, Request, SamplingOptions

__all__ = ["Service", "create_app", "serve", "encode_prompt"]

log = logging.getLogger("scaleformer.serve")
UNSUPPORTED = {"logprobs": None, "echo": False, "best_of": 1, "suffix": None, "logit_bias": None,
               "presence_penalty": 0, "frequency_penalty": 0}


class ServeError(Exception):
    """A request's error, as OpenAI's API reports one."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A text prompt's ids as ``scaleformer generate`` makes them: the byte tokenizer's documents start with
    BOS; an empty prompt is the start token alone."""
    from scaleformer.data.tokenizer import ByteTokenizer

    ids = tokenizer.encode(text, add_bos=isinstance(tokenizer, ByteTokenizer))
    if not ids and getattr(tokenizer, "bos_id", None) is not None:
        ids = [tokenizer.bos_id]
    return ids


@dataclass
class Choice:
    """One prompt of a completion request: its engine request and the text sent so far."""

    index: int
    request: Request
    stops: tuple[str, ...]
    sent: int = 0  # characters of the text already sent
    text: str = ""
    finish_reason: str | None = None


@dataclass
class Service:
    """The engine, the thread that steps it, and the queues its tokens go out on."""

    engine: Engine
    tokenizer: Any
    name: str
    max_queue: int = 64
    timeout: float = 120.0
    max_tokens: int = 4096
    draining: bool = False
    _queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = field(default_factory=dict)
    _work: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scaleformer-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._work.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work:
                self._work.wait(0.05)
                self._work.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as error:  # noqa: BLE001 - a bug must end its requests, not the server
                log.exception("engine step failed")
                events = self._fail_all(error)
            for request, token in events:
                target = self._queues.get(request.id)
                if target is not None:
                    target[0].call_soon_threadsafe(target[1].put_nowait, (request, token))

    def _fail_all(self, error: Exception) -> list[tuple[Request, int | None]]:
        engine = self.engine
        with engine._lock:
            ended = list(engine.running) + list(engine.waiting)
            engine.running, engine.cache = [], None
            engine.waiting.clear()
        for request in ended:
            request.finish_reason = f"error: {type(error).__name__}: {error}"
        return [(request, None) for request in ended]

    def submit(self, prompts: list[list[int]], options: SamplingOptions,
               queue: asyncio.Queue) -> list[Request]:
        """Queue the prompts (one engine request each), their tokens to arrive on ``queue``."""
        if self.draining:
            raise ServeError(503, "the server is shutting down", "server_error", code="shutting_down")
        if len(self.engine.waiting) + len(prompts) > self.max_queue:
            raise ServeError(429, f"the queue is full ({self.max_queue} waiting requests); retry later",
                             "rate_limit_exceeded", code="queue_full")
        loop = asyncio.get_running_loop()
        requests = []
        for prompt in prompts:
            try:
                request = self.engine.submit(prompt, options)
            except ValueError as error:
                for submitted in requests:
                    self.engine.cancel(submitted)
                raise ServeError(400, str(error), param="prompt") from None
            self._queues[request.id] = (loop, queue)
            requests.append(request)
        self._work.set()
        return requests

    def forget(self, requests: Sequence[Request]) -> None:
        for request in requests:
            if not request.done:
                self.engine.cancel(request)
            self._queues.pop(request.id, None)
        self._work.set()


# ------------------------------------------------------------------------------------------------------------
# The request: parsing and checks, then the text of each choice as its tokens arrive.
# ------------------------------------------------------------------------------------------------------------

def _number(body: dict, name: str, default: Any, kind: type, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        value = default
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ServeError(400, f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}",
                         param=name)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high) \
            or (kind is float and not math.isfinite(value)):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else '∞'}]"
        raise ServeError(400, f"{name} must be in {bounds}, got {value!r}", param=name)
    return kind(value)


def parse_completion(service: Service, body: Any) -> tuple[list[list[int]], SamplingOptions, tuple[str, ...], bool]:
    """(prompts as ids, options, stop strings, stream) of a /v1/completions body, or a ServeError."""
    if not isinstance(body, dict):
        raise ServeError(400, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ServeError(400, "model is required (see GET /v1/models)", param="model")
    if model != service.name:
        raise ServeError(404, f"the model {model!r} does not exist; this server serves {service.name!r}",
                         param="model", code="model_not_found")
    for name, default in UNSUPPORTED.items():
        if body.get(name, default) not in (default, None):
            raise ServeError(400, f"{name} is not supported by this server", param=name)
    if _number(body, "n", 1, int, 1) != 1:
        raise ServeError(400, "n > 1 is not supported: send the request n times (with different seeds)", param="n")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        prompts = prompt
    else:
        raise ServeError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists "
                         "of token ids", param="prompt")
    ids = [encode_prompt(service.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    if any(not prompt_ids for prompt_ids in ids):
        raise ServeError(400, "a prompt is empty and this tokenizer has no start token", param="prompt")
    max_tokens = _number(body, "max_tokens", 16, int, 0)
    if max_tokens > service.max_tokens:
        raise ServeError(400, f"max_tokens is {max_tokens}; this server generates at most {service.max_tokens} "
                         "tokens a request (scaleformer serve --max-tokens)", param="max_tokens")
    limit = service.engine.limit
    longest = max(len(p) for p in ids)
    if limit is not None and longest + max_tokens > limit:
        raise ServeError(400, f"this model's maximum context length is {limit} tokens; the prompt has {longest} "
                         f"and max_tokens asks for {max_tokens} more", param="max_tokens")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ServeError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServeError(400, f"stream must be true or false, got {stream!r}", param="stream")
    eos = getattr(service.tokenizer, "eos_id", None)
    try:
        options = SamplingOptions(max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, float, 0, 2),
                                  top_p=_number(body, "top_p", 1.0, float, 0, 1, low_open=True),
                                  top_k=_number(body, "top_k", None, int, 1), seed=_number(body, "seed", None, int),
                                  stop_tokens=() if eos is None else (eos,))
    except ValueError as error:
        raise ServeError(400, str(error)) from None
    if options.top_p == 1.0:  # no nucleus filtering: the same distribution, without a sort per token
        options = SamplingOptions(**{**options.__dict__, "top_p": None})
    return ids, options, stops, stream


def _advance_text(service: Service, choice: Choice, final: bool) -> str:
    """The new text of ``choice`` that can be sent now (``final``: its request had ended before this call
    read its tokens, so they are all there). Text that may still change is held back: a trailing partial
    UTF-8 character, and the tail that could begin a stop string. A stop string ends the choice (its text
    and what follows are not sent), as OpenAI's ``stop`` does."""
    request = choice.request
    tokens = list(request.tokens)  # the engine's thread appends to it
    if final and request.finish_reason == "stop" and tokens and tokens[-1] in request.options.stop_tokens:
        tokens = tokens[:-1]  # the end-of-sequence token is not text
    text = service.tokenizer.decode(tokens)
    for stop in choice.stops:
        at = text.find(stop, max(0, choice.sent - len(stop)))
        if at >= 0:
            text, choice.finish_reason, final = text[:at], "stop", True
    if not final:
        hold = max((len(s) - 1 for s in choice.stops), default=0)
        ready = len(text) - hold
        while ready > choice.sent and text[ready - 1] == "\ufffd":
            ready -= 1
        text = text[:max(ready, choice.sent)]
    new = text[choice.sent:]
    choice.sent, choice.text = len(text), text
    return new


async def _tokens(service: Service, choices: list[Choice], queue: asyncio.Queue) -> AsyncIterator[tuple[Choice, str]]:
    """Each choice's new text as its tokens arrive, until every choice has ended (then its finish_reason
    is set); a ServeError(504) past the service's time limit."""
    by_id = {choice.request.id: choice for choice in choices}
    deadline = time.monotonic() + service.timeout
    while any(choice.finish_reason is None for choice in choices):
        remaining = deadline - time.monotonic()
        try:
            request, _ = await asyncio.wait_for(queue.get(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise ServeError(504, f"the request took longer than this server's limit of {service.timeout:g} s "
                             "(scaleformer serve --timeout)", "timeout", code="timeout") from None
        choice = by_id[request.id]
        if choice.finish_reason is not None:
            continue
        if request.finish_reason is not None and request.finish_reason.startswith("error"):
            raise ServeError(500, f"generation failed: {request.finish_reason}", "server_error")
        done = request.done  # read before the tokens: once set, every token is in request.tokens
        new = _advance_text(service, choice, final=done)
        if done and choice.finish_reason is None:
            choice.finish_reason = "stop" if request.finish_reason == "stop" else "length"
        if choice.finish_reason is not None and not done:
            service.forget([request])  # a stop string ended it: free its row
        yield choice, new


def create_app(service: Service) -> Any:
    """The FastAPI application serving ``service``."""
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="scaleformer", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ServeError)
    async def _serve_error(_: HTTPRequest, error: ServeError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HTTPRequest, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(ServeError(400, f"invalid request: {error.errors()[0].get('msg', error)}").body(), 400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = service.engine
        return {"status": "draining" if service.draining else "ok", "running": len(engine.running),
                "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": created,
                                            "owned_by": "scaleformer"}]}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Any:
        raw = await http.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ServeError(400, f"the body is not valid JSON ({error})") from None
        prompts, options, stops, stream = parse_completion(service, body)
        queue: asyncio.Queue = asyncio.Queue()
        requests = service.submit(prompts, options, queue)
        choices = [Choice(index, request, stops) for index, request in enumerate(requests)]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": service.name}
        if not stream:
            try:
                async for _ in _tokens(service, choices, queue):
                    pass
            finally:
                service.forget(requests)
            return {**head, "choices": [{"text": c.text, "index": c.index, "logprobs": None,
                                         "finish_reason": c.finish_reason} for c in choices],
                    "usage": _usage(choices)}
        return StreamingResponse(_events(service, head, choices, queue, requests), media_type="text/event-stream")

    return app


def _usage(choices: list[Choice]) -> dict[str, Any]:
    prompt = sum(len(c.request.prompt) for c in choices)
    completion = sum(len(c.request.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.request.cached_prompt_tokens for c in choices)}}


async def _events(service: Service, head: dict, choices: list[Choice], queue: asyncio.Queue,
                  requests: list[Request]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of new text, one with each choice's finish_reason, then the
    usage and ``[DONE]``. An error after the stream began is sent as an ``error`` event."""
    def event(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    try:
        async for choice, text in _tokens(service, choices, queue):
            if text or choice.finish_reason is not None:
                yield event({**head, "choices": [{"text": text, "index": choice.index, "logprobs": None,
                                                  "finish_reason": choice.finish_reason}]})
        yield event({**head, "choices": [], "usage": _usage(choices)})
    except ServeError as error:
        yield event(error.body())
    finally:  # also when the client went away: its rows leave the batch
        service.forget(requests)
    yield "data: [DONE]\n\n"


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          max_batch: int = 16, max_queue: int = 64, timeout: float = 120.0, max_tokens: int = 4096,
          prefix_block: int = 32, prefix_cache_mb: float = 256.0, device: str = "cpu") -> None:
    """Load ``checkpoint`` and serve it until SIGTERM or Ctrl-C (see the module docstring)."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("scaleformer serve needs FastAPI and uvicorn: pip install \"scaleformer[serve]\"") from None
    import socket

    from scaleformer.build import load, require_language_model
    from scaleformer.train.checkpoint import resolve_checkpoint
    from scaleformer.data.tokenizer import load_tokenizer

    directory = resolve_checkpoint(str(checkpoint))
    model = load(directory, map_location=device)
    require_language_model(model.config, "serve")
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory / 'tokenizer.json'} not found: the server needs the tokenizer the "
                                "model was trained with")
    tokenizer = load_tokenizer(directory)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model {model.config.vocab_size}")
    prefixes = PrefixCache(prefix_block, int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
    engine = Engine(model, max_batch=max_batch, prefix_cache=prefixes)
    # the name the user gave: a run directory's, not that of the checkpoint inside it it resolves to
    service = Service(engine, tokenizer, name or Path(checkpoint).resolve().name, max_queue=max_queue, timeout=timeout,
                      max_tokens=max_tokens)
    app = create_app(service)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # port 0: the system picks a free one, printed below
    sock.listen(2048)  # connections wait in the backlog from the moment the address is printed

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM / Ctrl-C: refuse new work, finish the rest
            service.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own raises the signal again once shut down, so the process would end killed by it;
            # a server that finished every request on SIGTERM exits normally (status 0).
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(timeout) + 5)
    server = Server(config)
    bound = sock.getsockname()
    print(f"serving {service.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) at "
          f"http://{host}:{bound[1]}/v1 (model name {service.name!r}); SIGTERM or Ctrl-C stops it", flush=True)
    service.start()
    try:
        server.run(sockets=[sock])
    finally:
        service.stop()
    print("stopped: every request in flight finished", flush=True)
