"""The inference server: ``uvicorn worker.inference.app:app``, where the GPUs are.

It answers ``POST /v1/chat/completions`` (OpenAI's shape, SSE streaming included) for base models and
for fine-tuned adapters. The API process validates the caller and forwards requests here with
``citi_adapter`` set (model id, job id, base model); this server fetches the adapter from the
artifact store, keeps it in an LRU cache (``CITI_ADAPTER_CACHE_SIZE``), keeps every base model loaded
once, and batches concurrent requests (see :mod:`worker.inference.cache` for the batching and why one
batch serves one adapter). Without a GPU it runs on the CPU, slowly but the same way.

Tool calls (``tool_choice``):

- ``none``: the model is not shown the tools and its text is never parsed for calls.
- ``auto``: the tools are in the prompt; ``<tool_call>`` blocks in the reply become ``tool_calls``. The text
  is free, but a call to a function that ``tools`` does not define is dropped: it never comes back as a
  tool call (nor as content). An adapter whose job chose a call threshold (``calibration.json``, the
  ``call_threshold`` hyperparameter) opens a reply with a call only when the model is that sure: a bias of
  minus the threshold on the tokens that open ``<tool_call>`` while the reply is still empty (or whitespace; a
  request's own ``call_threshold``, our extension, takes its place, 0 turning it off);
  a reply that then opens with text is text, whatever it writes further on (every trained call opens its reply).
- ``required``: the reply is tool calls and nothing else. The start of a call block up to and including
  the function name, ``<tool_call>{"name": "<name>", "arguments":``, is fed as a generation prefix; the
  name is the tool the model itself finds most likely (the summed log-probability of each candidate
  prefix, one batched forward). The model writes the arguments under a grammar built from that
  function's JSON schema (constrained decoding, :mod:`citi_engine.constrained`), so they always parse and
  validate against ``parameters``; further calls (unless ``parallel_tool_calls: false``) are constrained
  the same way, to functions of ``tools`` only.
- a named function: the same, with that function's name in the prefix and only that function allowed.

The forced prefix is tokenised exactly as training tokenised a whole call (the shared token prefix of
the prompt followed by a complete call), so the model continues from tokens it has seen; the grammar
consumes the prefix, then masks each later token to what it allows. A reply cut by ``max_tokens`` before
its call closes (``finish_reason: length``) is the only way a forced call can fail to come back; its text
then stays ``content``. With ``named``, calls to other functions are dropped; with ``parallel_tool_calls:
false``, only the first call is kept.

``response_format`` (OpenAI's): ``json_object`` makes the reply one JSON object, ``json_schema`` JSON valid
against ``json_schema.schema``, both by the same constrained decoding (``strict`` is accepted and makes no
difference: the schema is always enforced). Under ``auto`` with tools, the reply is that JSON or tool calls;
under a forced call, the call. A schema the grammar library cannot compile (say, a regex ``pattern`` with
look-around) is refused before generation with 400 ``invalid_response_format`` (or ``invalid_tool_schema``
for a tool's ``parameters``) and the schema's ``param``. ``stop`` cannot be combined with a grammar (400).

Configuration (environment): ``CITI_ADAPTER_CACHE_SIZE`` (8), ``CITI_INFERENCE_MAX_BATCH`` (16),
``CITI_INFERENCE_BATCH_WAIT_MS`` (5), ``CITI_INFERENCE_DEVICE`` (cuda if present, else cpu),
``CITI_INFERENCE_DTYPE`` (bf16 on GPU, fp32 on CPU), ``CITI_INFERENCE_DECODE`` (auto: cuda_graphs on a GPU, else dynamic; static, compiled_graphs),
``CITI_INFERENCE_MAX_NEW_TOKENS`` (cap when a request sets none, 1024), ``CITI_INFERENCE_MAX_CONTEXT`` (cap on the model's context), ``CITI_INFERENCE_PRELOAD``
(base specs loaded at start), ``CITI_INFERENCE_CACHE_DIR`` (where adapters from S3 are unpacked),
plus the service's settings (:mod:`citi_service.settings`): storage, ``CITI_MODEL_DIRS``, ``CITI_ALLOWED_MODELS``
and ``CITI_INFERENCE_TOKEN``. Everything is read from the environment or a ``.env`` file, as the API reads it.

Access: the server trusts the adapter location the API sends, so nothing but the API may call it. It does not
start without ``CITI_INFERENCE_TOKEN`` and answers every request but ``GET /healthz`` with 401 unless it carries
that token as a bearer key; ``/healthz`` tells liveness and counts, never a model or adapter id. A base model
must pass the API's own allow-list (:mod:`citi_service.model_access`); an adapter's job id that is not one is 400.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Receive, Scope, Send

from citi_engine import DECODE_MODES
from citi_engine.constrained import GrammarError, reply_grammar
from citi_engine.data.chat_format import (
    TOOL_CALL_OPEN,
    call_threshold_bias,
    format_tool_calls,
    parse_reply,
    parse_tool_calls,
    render_prompt,
)
from citi_engine.errors import CitiError, ModelSpecError
from citi_service.chat import ChatCompletionRequest, check_request, inference_token
from citi_service.errors import APIError, error_body, install_error_handlers
from citi_service.keys import adapter_prefix
from citi_service.model_access import base_model_allowed
from citi_service.settings import get_settings
from citi_service.storage import check_prefix, make_storage
from worker.inference.cache import BatchScheduler, GenerationRequest, ModelCache, ServedModel

log = logging.getLogger("citi.inference")

JOB_ID = re.compile(r"^ftjob-[A-Za-z0-9_-]{1,64}$")


class InferenceSettings(BaseSettings):
    """Settings of the inference server (environment variables ``CITI_*``)."""

    model_config = SettingsConfigDict(env_prefix="CITI_", env_file=".env", extra="ignore")

    adapter_cache_size: int = Field(8, ge=1, description="CITI_ADAPTER_CACHE_SIZE: adapters kept loaded (LRU).")
    inference_max_batch: int = Field(16, ge=1, description="CITI_INFERENCE_MAX_BATCH: requests per batch.")
    inference_batch_wait_ms: float = Field(5.0, ge=0, description="CITI_INFERENCE_BATCH_WAIT_MS: how long a "
                                           "batch waits for company.")
    inference_device: str | None = Field(None, description="CITI_INFERENCE_DEVICE: cuda, cuda:1, cpu...")
    inference_dtype: str | None = Field(None, description="CITI_INFERENCE_DTYPE: bf16, fp16 or fp32.")
    inference_max_new_tokens: int = Field(1024, ge=1, description="CITI_INFERENCE_MAX_NEW_TOKENS: the reply "
                                          "length when a request sets no max_tokens.")
    inference_max_queue: int = Field(512, ge=1, description="CITI_INFERENCE_MAX_QUEUE: requests waiting or "
                                     "running before new ones get 503.")
    inference_preload: str = Field("", description="CITI_INFERENCE_PRELOAD: comma-separated base specs to load "
                                   "at start.")
    inference_cache_dir: str | None = Field(None, description="CITI_INFERENCE_CACHE_DIR: where adapters fetched "
                                            "from a remote store are kept.")
    inference_decode: Literal[DECODE_MODES] = Field(  # the engine's list: a new mode is one edit
        "auto", description="CITI_INFERENCE_DECODE: auto (cuda_graphs on a GPU, else dynamic; the jobs' evaluation "
        "default too), dynamic (a growing KV cache), static (a static KV cache), cuda_graphs (static, each decode "
        "step replayed from a CUDA graph on a GPU) or compiled_graphs (the same with the step compiled by "
        "torch.compile first); greedy replies are the same up to the device's arithmetic.")


# ------------------------------------------------------------------------------------------ service


class InferenceService:
    """The server's state: model cache, batching loop, adapter fetching, request preparation."""

    def __init__(self, settings: InferenceSettings | None = None):
        self.settings = settings or InferenceSettings()
        service = get_settings()
        self.model_dirs = service.model_dirs_list or None
        self.cache = ModelCache(device=self.settings.inference_device, dtype=self.settings.inference_dtype,
                                model_dirs=self.model_dirs, adapter_cache_size=self.settings.adapter_cache_size,
                                decode=self.settings.inference_decode)
        self.scheduler = BatchScheduler(self.cache, max_batch_size=self.settings.inference_max_batch,
                                        max_wait_ms=self.settings.inference_batch_wait_ms)
        self._storage = None
        self._in_flight = 0
        cache_root = self.settings.inference_cache_dir or str(Path(tempfile.gettempdir()) / "citi-inference")
        self.adapter_root = Path(cache_root) / "adapters"
        self._fetch_locks: dict[str, asyncio.Lock] = {}

    @property
    def storage(self):
        """The artifact store adapters come from (the service's, per ``CITI_STORAGE``)."""
        if self._storage is None:
            self._storage = make_storage(get_settings())
        return self._storage

    # -- models ------------------------------------------------------------------------------------

    def _fetch_adapter(self, adapter: dict[str, Any]) -> Path:
        """The local directory of an adapter: in place for local storage, else downloaded once."""
        prefix = check_prefix(adapter_prefix(adapter["job_id"]))
        local = self.storage.local_path(prefix.rstrip("/"))
        if local is not None:
            if not (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
                raise FileNotFoundError(prefix)
            return local
        target = self.adapter_root / check_prefix(adapter["job_id"]).rstrip("/")
        if target.is_dir():
            return target
        self.adapter_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.adapter_root, prefix=".fetch-"))
        try:
            if self.storage.download_dir(prefix, tmp) == 0:
                raise FileNotFoundError(prefix)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    async def served_model(self, req: ChatCompletionRequest) -> ServedModel:
        """Load (or find) the base model or adapter the request names; 404 when there is none."""
        adapter = req.citi_adapter
        try:
            if adapter is None:
                if not base_model_allowed(req.model, get_settings()):
                    raise APIError(404, "model_not_found", f"The model '{req.model}' is not served here: it is not "
                                   "allowed on this service (CITI_ALLOWED_MODELS, else the built-in model or one "
                                   "under CITI_MODEL_DIRS)", param="model")
                base = await asyncio.to_thread(self.cache.base, req.model)
                return ServedModel(base=base)
            for key in ("id", "job_id"):
                if not isinstance(adapter.get(key), str) or not adapter[key]:
                    raise APIError(400, "invalid_request", f"citi_adapter.{key} is missing", param="citi_adapter")
            if not JOB_ID.match(adapter["job_id"]):
                raise APIError(400, "invalid_request", "citi_adapter.job_id is not a job id (ftjob- and up to 64 "
                               "letters, digits, '_' or '-')", param="citi_adapter.job_id")
            lock = self._fetch_locks.setdefault(adapter["job_id"], asyncio.Lock())
            async with lock:  # one download per adapter, however many requests wait for it
                adapter_dir = await asyncio.to_thread(self._fetch_adapter, adapter)
            return await asyncio.to_thread(self.cache.adapter, adapter["id"], adapter_dir, adapter.get("base_model"))
        except (FileNotFoundError, ModelSpecError) as exc:
            log.info("model %s not servable: %s", req.model, exc)
            raise APIError(404, "model_not_found",
                           f"The model '{req.model}' does not exist or its files are not available on this server"
                           + (f": {exc.message}" if isinstance(exc, ModelSpecError) else ""),
                           param="model") from exc
        except CitiError as exc:
            raise APIError(400, exc.code, exc.message, param=exc.param or "model") from exc

    # -- requests ----------------------------------------------------------------------------------

    def prepare(self, req: ChatCompletionRequest, served: ServedModel) -> tuple[GenerationRequest, int]:
        """Render and tokenise the request, check it fits the context, and set up forced prefixes.

        Returns the generation request and the prompt's token count. Runs in a worker thread.
        """
        tok = served.tokenizer
        conv = req.conversation()
        prompt_text = render_prompt(tok, conv["messages"], conv["tools"] or None)
        # The rendered template spells out its special tokens; adding them again would double them.
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        n_prompt = len(prompt_ids)
        limit = served.max_context
        wanted = req.completion_limit
        if wanted is None:
            wanted = min(self.settings.inference_max_new_tokens, limit - n_prompt)
            if wanted < 1:
                raise context_error(limit, n_prompt, None)
        elif n_prompt + wanted > limit:
            raise context_error(limit, n_prompt, wanted)
        mode, name = req.tool_mode()
        options: list[list[int]] = []
        if mode in ("required", "named"):
            names = [name] if mode == "named" else [t.function.name for t in req.tools or []]
            options = [forced_call_prefix(tok, prompt_text, prompt_ids, n) for n in names]
            if any(len(o) >= wanted for o in options):
                raise APIError(400, "invalid_request",
                               f"max_tokens={wanted} leaves no room for a forced tool call; raise max_tokens",
                               param="max_tokens")
        fmt = req.response_format
        try:
            grammar = reply_grammar(tok, tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
                                    tool_choice=mode, function=name, response_format=fmt.type if fmt else None,
                                    schema=fmt.reply_schema if fmt else None,
                                    parallel=req.parallel_tool_calls is not False)
        except GrammarError as exc:
            raise APIError(400, exc.code, exc.message, param=exc.param) from exc
        gen = GenerationRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=wanted,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stop_list,
            prefix_options=options,
            grammar=grammar,
        )
        if mode == "auto" and req.tools:
            gen.opening_bias = call_threshold_bias(
                tok, served.call_threshold if req.call_threshold is None else req.call_threshold)
        return gen, n_prompt


def context_error(limit: int, n_prompt: int, wanted: int | None) -> APIError:
    """400 for a prompt (plus the reply it asks for) longer than the model's context, with the counts."""
    if wanted is None:
        message = (f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
                   f"{n_prompt} tokens, which leaves no room for a reply. Please reduce the length of the messages.")
    else:
        message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                   f"{n_prompt + wanted} tokens ({n_prompt} in the messages, {wanted} in the completion). Please "
                   "reduce the length of the messages or completion.")
    return APIError(400, "context_length_exceeded", message, param="messages",
                    details=[{"code": "context_length_exceeded", "message": message, "param": "messages",
                              "max_context": limit, "prompt_tokens": n_prompt, "max_tokens": wanted}])


def forced_call_prefix(tokenizer: Any, prompt_text: str, prompt_ids: list[int], name: str) -> list[int]:
    """Token ids that start the assistant's reply with a call of ``name``, up to ``"arguments":``.

    Tokenised as in training: the tokens that the prompt followed by a complete call (any arguments)
    and the prompt followed by the bare prefix have in common, after the prompt's own tokens.
    """
    full = format_tool_calls([{"function": {"name": name, "arguments": "{\"x\": 1}"}}])
    cut = full.index('"arguments":') + len('"arguments":')
    prefix_text = full[:cut]
    a = tokenizer(prompt_text + prefix_text, add_special_tokens=False)["input_ids"]
    b = tokenizer(prompt_text + full, add_special_tokens=False)["input_ids"]
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    if a[: len(prompt_ids)] == prompt_ids and common > len(prompt_ids):
        return a[len(prompt_ids):common]
    # The prompt's last token merges with the call's first: tokenise the call on its own instead.
    return tokenizer(prefix_text, add_special_tokens=False)["input_ids"]


def accepted_calls(req: ChatCompletionRequest, calls: list[dict]) -> list[dict]:
    """Calls the request allows: only functions of ``tools`` (only the named one for a named tool choice); one
    with parallel_tool_calls false."""
    mode, name = req.tool_mode()
    defined = {name} if mode == "named" else {t.function.name for t in req.tools or []}
    calls = [c for c in calls if c["function"]["name"] in defined]
    if req.parallel_tool_calls is False:
        calls = calls[:1]
    return calls


def finish_reason(gen: GenerationRequest, calls: list[dict]) -> str:
    """OpenAI's finish_reason: ``length`` when the budget ran out, else ``tool_calls`` or ``stop``."""
    if gen.finish_reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


def completion_id() -> str:
    """A fresh ``chatcmpl-`` id."""
    return "chatcmpl-" + secrets.token_hex(12)


def build_completion(req: ChatCompletionRequest, gen: GenerationRequest, n_prompt: int, fingerprint: str) -> dict:
    """The ``chat.completion`` object of a finished generation."""
    mode, _ = req.tool_mode()
    content: str | None = gen.text
    calls: list[dict] = []
    if mode != "none":
        content, calls = parse_reply(gen.text, opening_only=bool(gen.opening_bias))
        calls = accepted_calls(req, calls)
        if not calls and content is None:
            content = ""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(gen, calls), "logprobs": None}],
        "usage": usage(n_prompt, gen.completion_tokens),
    }


def usage(n_prompt: int, n_completion: int) -> dict:
    """The ``usage`` object."""
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


class ToolCallStream:
    """Turns raw text deltas into chat-completion deltas: content as it comes, tool calls as each block closes.

    Text that might be the start of a ``<tool_call>`` block is held back until it is clear. Once a block
    opens, everything after it is held; each completed block is parsed alone and sent as a tool call (its
    id, type and name, then its arguments). At the end the whole text is parsed once more, the same way
    the non-streaming answer is, and whatever content that leaves (text after the calls, or a block that
    did not parse) is sent.
    """

    def __init__(self, req: ChatCompletionRequest, opening_only: bool = False):
        self.req = req
        self.parse = req.tool_mode()[0] != "none"
        self.opening_only = opening_only  # served with a call threshold: only a reply that opens with a call has any
        self.text = ""
        self.sent = 0  # characters of self.text sent as content
        self.calls_from = None  # where the first <tool_call> starts
        self.scanned = 0  # where the next block search starts
        self.calls: list[dict] = []

    def _content(self, upto: int) -> list[dict]:
        if upto <= self.sent:
            return []
        piece = self.text[self.sent:upto]
        self.sent = upto
        return [{"content": piece}]

    def feed(self, delta: str) -> list[dict]:
        """Deltas to send for a new piece of generated text."""
        self.text += delta
        if not self.parse:
            return self._content(len(self.text))
        out: list[dict] = []
        if self.calls_from is None and self.opening_only:
            start = self.text.lstrip()
            if start and not (TOOL_CALL_OPEN.startswith(start) or start.startswith(TOOL_CALL_OPEN)):
                self.parse = False  # the reply opened with text: all of it is content
                return self._content(len(self.text))
        if self.calls_from is None:
            at = self.text.find(TOOL_CALL_OPEN, self.sent)
            if at < 0:
                hold = 0
                for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(TOOL_CALL_OPEN[:k]):
                        hold = k
                        break
                return self._content(len(self.text) - hold)
            out += self._content(at)
            self.calls_from = self.scanned = at
        while True:
            close = self.text.find("</tool_call>", self.scanned)
            if close < 0:
                return out
            end = close + len("</tool_call>")
            _, calls = parse_tool_calls(self.text[self.scanned:end])
            self.scanned = end
            for call in calls:
                out += self._add_call(call)

    def _add_call(self, call: dict) -> list[dict]:
        if not accepted_calls(self.req, [*self.calls, call])[len(self.calls):]:
            return []
        index = len(self.calls)
        self.calls.append(call)
        fn = call["function"]
        return [
            {"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                             "function": {"name": fn["name"], "arguments": ""}}]},
            {"tool_calls": [{"index": index, "function": {"arguments": fn["arguments"]}}]},
        ]

    def finish(self) -> list[dict]:
        """Deltas still owed once generation has ended."""
        if not self.parse:
            return self._content(len(self.text))
        if self.calls_from is None:
            return self._content(len(self.text))
        content, calls = parse_tool_calls(self.text)
        out: list[dict] = []
        for call in accepted_calls(self.req, calls)[len(self.calls):]:
            out += self._add_call(call)
        # The final content is stripped and has the parsed blocks cut out; send what the stream has not.
        streamed = self.text[: self.sent].strip()
        if content and content.startswith(streamed) and len(content) > len(streamed):
            out.append({"content": content[len(streamed):]})
        return out


# ------------------------------------------------------------------------------------------ app


def _service(request: Request) -> InferenceService:
    return request.app.state.service


PUBLIC_PATHS = ("/healthz",)


class TokenMiddleware:
    """401 for every request but ``/healthz`` that does not carry ``CITI_INFERENCE_TOKEN`` as a bearer key
    (unknown paths included, so an unauthenticated caller learns nothing about the server)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            expected = inference_token()
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            presented = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
            if expected is None or not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
                error = APIError(401, "invalid_api_key", "this inference server is called by the citi API only: "
                                 "send CITI_INFERENCE_TOKEN as a bearer key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


@asynccontextmanager
async def lifespan(app: FastAPI):
    if inference_token() is None:
        raise RuntimeError("CITI_INFERENCE_TOKEN is not set: the inference server does not start without the secret "
                           "the API presents. Set the same value for the API and the inference server, in .env or "
                           "the environment (python3 -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    service = InferenceService()
    app.state.service = service
    for spec in [s.strip() for s in service.settings.inference_preload.split(",") if s.strip()]:
        await asyncio.to_thread(service.cache.base, spec)
    log.info("inference server ready on %s", service.cache.device)
    try:
        yield
    finally:
        await service.scheduler.close()


app = FastAPI(title="citi inference server", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
              openapi_url=None,
              description="Serves base models and CITI adapters behind an OpenAI-compatible chat endpoint; "
              "the API forwards to it (CITI_INFERENCE_URL).")
install_error_handlers(app)
app.add_middleware(TokenMiddleware)


@app.get("/healthz")
def healthz(request: Request) -> dict:
    """Liveness and counts: device, base models and adapters loaded, batches run. No model or adapter ids: it
    needs no token (container health checks call it), so it tells nothing about any tenant."""
    service = _service(request)
    return {
        "status": "ok",
        "device": service.cache.device,
        "decode": service.cache.decode,
        "base_models": len(service.cache.loaded_bases()),
        "adapters": len(service.cache.cached_adapters()),
        "adapter_cache_size": service.cache.adapter_cache_size,
        "batches": service.scheduler.batches_run,
        "in_flight": service._in_flight,
    }


@app.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Generate a chat completion (streamed as SSE when ``stream`` is true)."""
    service = _service(request)
    check_request(body)
    if service._in_flight >= service.settings.inference_max_queue:
        raise APIError(503, "overloaded", "the inference server is at its queue limit; retry shortly",
                       headers={"Retry-After": "1"})
    served = await service.served_model(body)
    gen, n_prompt = await asyncio.to_thread(service.prepare, body, served)
    fingerprint = f"citi-{served.adapter.id if served.adapter else 'base'}"
    if not body.stream:
        service._in_flight += 1
        try:
            await service.scheduler.submit(served, gen)
        finally:
            service._in_flight -= 1
        return JSONResponse(build_completion(body, gen, n_prompt, fingerprint))
    return StreamingResponse(_stream(service, served, body, gen, n_prompt, fingerprint),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _stream(service: InferenceService, served: ServedModel, req: ChatCompletionRequest,
                  gen: GenerationRequest, n_prompt: int, fingerprint: str) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    gen.on_text = lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta)
    base = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": req.model, "system_fingerprint": fingerprint}

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    service._in_flight += 1
    task = asyncio.create_task(service.scheduler.submit(served, gen))
    assembler = ToolCallStream(req, opening_only=bool(gen.opening_bias))
    try:
        yield chunk({"role": "assistant", "content": "", "refusal": None})
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                for delta in assembler.feed(getter.result()):
                    yield chunk(delta)
                continue
            getter.cancel()
            break
        while not queue.empty():  # deltas the generation thread queued just before it finished
            for delta in assembler.feed(queue.get_nowait()):
                yield chunk(delta)
        try:
            task.result()
        except Exception:  # noqa: BLE001 - the client has the 200 already: report inside the stream
            log.exception("generation failed mid-stream")
            yield _sse(error_body(500, "generation_failed", "generation failed on the inference server; it logged "
                                  "the details"))
            yield b"data: [DONE]\n\n"
            return
        for delta in assembler.finish():
            yield chunk(delta)
        yield chunk({}, finish_reason(gen, assembler.calls))
        if req.stream_options is not None and req.stream_options.include_usage:
            yield _sse({**base, "choices": [], "usage": usage(n_prompt, gen.completion_tokens)})
        yield b"data: [DONE]\n\n"
    finally:
        service._in_flight -= 1
        if not task.done():  # the client went away: stop generating for it
            gen.cancelled.set()
            task.cancel()
