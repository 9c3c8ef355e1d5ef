"""Generate chat replies, batched, with the same prompt rendering that training uses.

One small decoding loop serves evaluation, replay and retention:
left-padded prompts (padding on the left keeps every row's last token at the end, so one forward
per step serves the whole batch), a KV cache, greedy decoding at temperature 0, else temperature and
nucleus (top-p) sampling from a seeded generator. A row ends at the tokenizer's end-of-turn / EOS
token, at a stop string, or after ``max_new_tokens``. The inference server's loop
(:mod:`citi_engine.serving`: per-request sampling settings, finished rows leaving the batch, text
streamed as it comes) is built on the same pieces: ``pad_left``, ``prefill``, ``forward_last_logits``,
``sample_tokens`` and ``stop_token_ids``.

The prompts go into the KV cache in chunks of columns (:func:`prefill`), so the memory of a batch of long
prompts grows linearly with batch x prompt length. Fed whole, a left-padded batch makes transformers build
a dense (batch, 1, prompt, prompt) mask, which SDPA turns into an additive mask at every layer, and the
attention kernels that take a mask may build batch x heads x prompt x prompt scores: quadratic in the
prompt (evaluation at batch 96-128 over 1,000-3,000-token prompts took 38-50 GB for a 135M model).

Why our own loop and not ``model.generate``: the same code must behave the same under the
transformers versions of the CPU and GPU machines; stop strings, per-step cancellation and text
streaming fall out of it directly, and ``generate`` merges the checkpoint's generation defaults
(sampling, repetition penalties) into ours.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from citi_engine import GRAPH_MODES, resolve_decode
from citi_engine.errors import Cancelled

log = logging.getLogger("citi.generate")

# End-of-turn tokens of common chat templates; each counts only when the tokenizer's vocabulary has it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>")


@dataclass
class Generation:
    """One generated reply.

    ``text`` is the raw reply (end-of-turn token and stop string removed); ``content`` and
    ``tool_calls`` are what :func:`citi_engine.data.chat_format.parse_tool_calls` reads from it.
    ``finish_reason`` is ``tool_calls`` when calls were parsed, ``length`` when ``max_new_tokens``
    ran out, else ``stop``. ``completion_ids`` are the generated token ids, the end-of-turn token
    included when one was generated (retention scores the base model's answers on them).
    """

    text: str
    content: str | None
    tool_calls: list[dict]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    completion_ids: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """The reply as plain JSON (without the token ids)."""
        return {
            "text": self.text,
            "content": self.content,
            "tool_calls": self.tool_calls,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


# ------------------------------------------------------------------------------------------ tokens


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS, the model's configured EOS ids, and end-of-turn
    tokens of common templates that this vocabulary has (``<|im_end|>`` for SmolLM2)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_config = getattr(model, "generation_config", None)
    configured = getattr(gen_config, "eos_token_id", None)
    if configured is None:
        configured = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(i) for i in configured if i is not None)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in END_OF_TURN_TOKENS if tok in vocab)
    return ids


def encode_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of the rendered conversation with the generation prompt (see ``render_prompt``)."""
    from citi_engine.data.chat_format import render_prompt

    text = render_prompt(tokenizer, messages, tools or None)
    # The rendered template already spells out any BOS/turn tokens; adding special tokens would double them.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_left(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``rows`` padded on the left to one width, on ``device``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def model_device(model) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode for the block and restore its training flag after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


# ---------------------------------------------------------------------------------------- decoding


_FORWARD_NAMES: dict[type, tuple[str, bool]] = {}


def _forward_names(model) -> tuple[str, bool]:
    """The model's name for the KV cache argument and whether it takes ``logits_to_keep``.

    transformers renamed ``past_key_values`` to ``cache`` (5.2x); the GPU machine runs an older 5.x.
    A peft wrapper forwards keyword arguments, so the wrapped model's signature decides.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = _FORWARD_NAMES.get(type(inner))
    if names is None:
        params = inspect.signature(inner.forward).parameters
        names = ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params
        _FORWARD_NAMES[type(inner)] = names
    return names


def forward_logits(model, cache=None, keep: int = 1, **inputs) -> tuple[torch.Tensor, object]:
    """Logits of the last ``keep`` positions (rows x keep x vocabulary, the model's dtype) and the KV cache.

    The model is asked for those positions only when it can (``logits_to_keep``), so a forward over a long
    chunk never holds rows x chunk x vocabulary logits.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    cache_name, keeps_logits = _forward_names(model)
    if cache is not None:
        inputs[cache_name] = cache
    if keeps_logits:
        inputs["logits_to_keep"] = keep
    out = model(**inputs, use_cache=True)
    new_cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
    return out.logits[:, -keep:, :], new_cache


def forward_last_logits(model, cache=None, **inputs) -> tuple[torch.Tensor, object]:
    """Logits of the last position (fp32) and the KV cache; asks the model for the last position only when it can."""
    logits, new_cache = forward_logits(model, cache, 1, **inputs)
    return logits[:, -1, :].float(), new_cache


# Tokens of one prefill forward (rows x chunk columns) when the caller gives no chunk length: a chunk's
# attention is rows x heads x chunk x prompt, so this caps it at heads x PREFILL_TOKENS x prompt, whatever
# the batch size.
PREFILL_TOKENS = 8192
# Shortest chunk chosen for large batches: shorter ones add forwards without saving much.
MIN_PREFILL_CHUNK = 32


def prefill_chunk_for(rows: int) -> int:
    """The chunk length :func:`generate_ids` uses for a batch of ``rows`` prompts unless told one."""
    return max(MIN_PREFILL_CHUNK, PREFILL_TOKENS // max(1, rows))


def forward_in_chunks(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor | None = None, chunk: int = 0,
                      keep: Callable[[int, int], int] | None = None) -> Iterator[tuple[int, int, torch.Tensor, object]]:
    """Run rows through the model ``chunk`` columns per forward (0: all in one), with a KV cache between forwards.

    Yields ``(start, end, logits, cache)`` per chunk: ``logits`` of the chunk's last ``keep(start, end)`` columns
    (default 1), asked of the model alone (no rows x chunk x vocabulary tensor). Each chunk attends to the cache and
    to itself through the 2-D mask of every column so far, so every position sees the keys it would see in one
    forward, and a forward's attention is rows x heads x chunk x columns so far: memory linear in the row length.
    """
    if chunk < 0:
        raise ValueError(f"prefill_chunk must be 0 (whole prompts in one forward) or positive, got {chunk}")
    width = input_ids.shape[1]
    step = chunk if chunk > 0 else width
    cache = None
    for start in range(0, width, step):
        end = min(start + step, width)
        inputs = {"input_ids": input_ids[:, start:end], "attention_mask": attention_mask[:, :end]}
        if position_ids is not None:
            inputs["position_ids"] = position_ids[:, start:end]
        logits, cache = forward_logits(model, cache, keep(start, end) if keep else 1, **inputs)
        yield start, end, logits, cache


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            chunk: int = 0) -> tuple[torch.Tensor, object]:
    """Feed left-padded prompts into a new KV cache, ``chunk`` columns per forward (0: all in one forward;
    :func:`forward_in_chunks`). Returns the last column's logits (fp32) and the cache; greedy replies are those
    of one forward."""
    *_, (_, _, logits, cache) = forward_in_chunks(model, input_ids, attention_mask, position_ids, chunk)
    return logits[:, -1, :].float(), cache


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of ``logits`` (B, V): argmax at temperature 0, else a nucleus sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest set of tokens whose mass reaches top_p (the most likely token always stays),
    # sample a rank among them, and map the rank back to its token.
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    rank = torch.multinomial(sorted_probs.masked_fill(outside, 0.0), num_samples=1, generator=generator)
    return order.gather(-1, rank).squeeze(-1)


class _DynamicDecoder:
    """Prefill and decode steps of one left-padded batch over a KV cache that grows with the replies; the same
    two calls as :class:`citi_engine.static_decode.StaticDecoder`."""

    def __init__(self, model, input_ids: torch.Tensor, mask: torch.Tensor):
        self.model, self.input_ids, self.mask = model, input_ids, mask
        # Positions count real tokens only, so a left-padded row sees the same positions as alone.
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = None

    def prefill(self, chunk: int) -> torch.Tensor:
        logits, self.cache = prefill(self.model, self.input_ids, self.mask, self.positions, chunk)
        self.positions = self.positions[:, -1:] + 1
        return logits

    def step(self, tokens: list[int]) -> torch.Tensor:
        feed = torch.tensor(tokens, device=self.mask.device).unsqueeze(-1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=-1)
        logits, self.cache = forward_last_logits(self.model, input_ids=feed, attention_mask=self.mask,
                                                 position_ids=self.positions, cache=self.cache)
        self.positions = self.positions + 1
        return logits


def _token_steps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    done: list[bool],
    should_cancel: Callable[[], bool] | None,
    prefill_chunk: int = 0,
    decode: str = "dynamic",
) -> Iterator[list[int]]:
    """Yield the next token of every row, step by step, until ``max_new_tokens`` or every row is ``done``.

    The caller marks rows ``done``; a finished row still takes part in the forward (it is fed padding and its
    token is ignored), which keeps the batch shape and the cache simple. The prompts go in ``prefill_chunk``
    columns at a time (see :func:`prefill`). ``decode`` picks the KV cache (:func:`generate_ids`).
    """
    from citi_engine.static_decode import StaticDecoder

    device = model_device(model)
    # Grad mode is thread state: hold inference mode only around the compute, never across a yield,
    # so a caller iterating a stream does not run its own code in inference mode.
    with torch.inference_mode():
        input_ids, attention_mask = pad_left(prompt_ids, pad_id, device)
        generator = None
        if temperature > 0 and seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        if decode == "dynamic":
            decoder = _DynamicDecoder(model, input_ids, attention_mask)
        else:
            decoder = StaticDecoder(model, input_ids, attention_mask, max_new_tokens, graphs=decode in GRAPH_MODES,
                                    compiled=decode == "compiled_graphs")
        tokens = sample_tokens(decoder.prefill(prefill_chunk), temperature, top_p, generator)
    for step in range(max_new_tokens):
        yield tokens.tolist()
        if all(done) or step == max_new_tokens - 1:
            return
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        with torch.inference_mode():
            fed = [pad_id if finished else token for token, finished in zip(tokens.tolist(), done, strict=True)]
            tokens = sample_tokens(decoder.step(fed), temperature, top_p, generator)


class _Row:
    """The reply of one row as it grows: token ids, why it ended, and where a stop string cut it."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.ids: list[int] = []
        self.ended_by: str | None = None  # "eos" | "stop" | "length"
        self.cut: int | None = None  # character index of the stop string in the decoded text

    def add(self, token: int, stop_ids: set[int], tokenizer, stop: Sequence[str]) -> None:
        self.ids.append(token)
        if token in stop_ids:
            self.ended_by = "eos"
            return
        if stop:
            text = tokenizer.decode(self.ids, skip_special_tokens=False)
            hits = [text.find(s) for s in stop if s and s in text]
            if hits:
                self.ended_by, self.cut = "stop", min(hits)

    def text(self, tokenizer) -> str:
        ids = self.ids[:-1] if self.ended_by == "eos" else self.ids
        # Special tokens stay in: a template may make <tool_call> a special token, and parsing needs it.
        text = tokenizer.decode(ids, skip_special_tokens=False)
        return text[: self.cut] if self.cut is not None else text


def _finish(row: _Row, tokenizer, parse: bool) -> Generation:
    text = row.text(tokenizer)
    content: str | None = text
    tool_calls: list[dict] = []
    if parse:
        from citi_engine.data.chat_format import parse_tool_calls

        content, tool_calls = parse_tool_calls(text)
    if tool_calls:
        reason = "tool_calls"
    elif row.ended_by in ("eos", "stop"):
        reason = "stop"
    else:
        reason = "length"
    return Generation(
        text=text,
        content=content,
        tool_calls=tool_calls,
        finish_reason=reason,
        prompt_tokens=row.prompt_len,
        completion_tokens=len(row.ids),
        completion_ids=list(row.ids),
    )


def _check_sampling(max_new_tokens: int, batch_size: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    parse: bool = True,
    prefill_chunk: int | None = None,
    decode: str = "dynamic",
) -> list[Generation]:
    """Generate a reply for each prompt given as token ids; the replies come back in the prompts' order.

    Prompts are batched by length (less padding). ``parse=False`` skips tool-call parsing (plain
    completions, e.g. code). ``should_cancel`` is checked between batches and between steps; when it
    turns true, :class:`~citi_engine.errors.Cancelled` is raised. ``prefill_chunk``: prompt tokens per
    row that one prefill forward takes (:func:`prefill`); None picks :func:`prefill_chunk_for` the
    batch, 0 feeds whole prompts in one forward (memory quadratic in the prompt length). A batch that runs
    out of device memory is generated again as two halves (greedy replies are the same; a warning is logged),
    so ``batch_size`` is a ceiling, not a promise the device must keep. ``decode``: the KV cache of the decode
    loop, ``dynamic`` (grows with the replies), ``static`` (allocated once per batch), ``cuda_graphs`` (static,
    each step replayed from a CUDA graph on a GPU: far fewer kernel launches for a small model; static elsewhere)
    or ``compiled_graphs`` (the same with the step compiled by ``torch.compile``: fused kernels), or ``auto``
    (:func:`citi_engine.resolve_decode`: ``cuda_graphs`` on a GPU, else ``dynamic``); the replies are the same up
    to the device's arithmetic.
    """
    _check_sampling(max_new_tokens, batch_size, temperature, top_p)
    decode = resolve_decode(decode, model_device(model).type)
    stop = [s for s in (stop or []) if s]
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids, default=0)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)

    def run(batch: list[int], batch_seed: int | None) -> None:
        """One batch; a batch the device has no memory for is done as two halves instead."""
        rows = [_Row(len(prompts[i])) for i in batch]
        done = [False] * len(batch)
        chunk = prefill_chunk_for(len(batch)) if prefill_chunk is None else prefill_chunk
        try:
            for tokens in _token_steps(
                model, [prompts[i] for i in batch], pad_id=pad_id, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, seed=batch_seed, done=done, should_cancel=should_cancel,
                prefill_chunk=chunk, decode=decode,
            ):
                for j, token in enumerate(tokens):
                    if not done[j]:
                        rows[j].add(token, stop_ids, tokenizer, stop)
                        done[j] = rows[j].ended_by is not None
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            rows = done = None  # let the half-built batch go before the halves run
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(batch) // 2
            log.warning("out of memory generating %d replies at once; going on %d and %d at a time",
                        len(batch), half, len(batch) - half)
            run(batch[:half], batch_seed)
            run(batch[half:], None if batch_seed is None else batch_seed + half)
            return
        for j, i in enumerate(batch):
            results[i] = _finish(rows[j], tokenizer, parse)

    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            # One seed per batch position keeps sampled replies reproducible for a given batching.
            run(order[start:start + batch_size], None if seed is None else seed + start)
    return results  # type: ignore[return-value]


def generate_chat(
    model,
    tokenizer,
    conversations: Sequence[dict],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    prefill_chunk: int | None = None,
    decode: str = "dynamic",
) -> list[Generation]:
    """Reply to each conversation (``{"messages": [...], "tools": [...]}``), batched, in order.

    Greedy when ``temperature`` is 0, else sampling with ``temperature`` and ``top_p`` (reproducible
    with ``seed``). Each reply stops at the end-of-turn token, at any of the ``stop`` strings, or after
    ``max_new_tokens``; its tool calls are parsed from the text. ``prefill_chunk`` and ``decode`` as in
    :func:`generate_ids`.
    """
    prompts = [encode_prompt(tokenizer, c["messages"], c.get("tools")) for c in conversations]
    return generate_ids(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
        top_p=top_p, seed=seed, stop=stop, should_cancel=should_cancel, prefill_chunk=prefill_chunk, decode=decode,
    )
