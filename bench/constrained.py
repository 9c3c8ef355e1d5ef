"""Constrained decoding on our own decode loop: what a grammar library costs per token and per schema.

    python bench/constrained.py                     # SmolLM2-135M-Instruct and the tiny test model, on CPU
    python bench/constrained.py --models smollm2 --rounds 5 --machine "2-core CPU dev machine"

Candidates: llguidance, xgrammar and outlines-core, each installed from PyPI (``pip install llguidance
xgrammar outlines-core``; a library that is missing is reported as such, not skipped silently). Each one
is plugged into :func:`citi_engine.serving.generate` through the same two calls the runtime makes of a
matcher (fill the next-token bitmask, accept the chosen token), so all three run inside the loop the
inference server runs, with the same bitmask application (:func:`citi_engine.constrained.apply_bitmask`).

Measured, per library and model:

- **tokenizer setup**: the library's one-off view of the tokenizer (once per served model);
- **compile**: turning one tool-argument JSON schema into a grammar and its first matcher (median over
  ``--compiles`` schemas that differ in a property name, so no cache answers); this is paid per request,
  since every request brings its own tools;
- **request grammar** (llguidance, the library chosen): compiling what the inference server compiles for a
  ``tool_choice: required`` request with two tools (:func:`citi_engine.constrained.reply_grammar`: names and
  both argument schemas in one grammar), median over ``--compiles``;
- **mask per token**: fill the bitmask plus accept the token, timed inside the loop (mean over all steps);
- **decode ms/token**, free against constrained: one request (and ``--batch`` at once) decoding from the
  same prompt; the constrained reply is a JSON object of the schema, the free one as many tokens with
  end-of-turn ignored, so both decode the same number of steps. Decode time is the time after the first
  token over the tokens after the first. Rounds alternate free and constrained; the overhead is the median
  over rounds of constrained over free. Target: <= 10 % per token.

Writes ``bench/results/constrained.{md,json}`` (``--md`` / ``--json``). Every number comes from this run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from provenance import cpu_name  # noqa: E402

TARGET = 0.10
LIBRARIES = ("llguidance", "xgrammar", "outlines-core")

# A tool's arguments as a model writes them: strings, an enum, bounded numbers, a boolean, an array.
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "include_hourly": {"type": "boolean"},
        "fields": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["city", "unit", "days", "include_hourly", "fields"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "Give the weather request for Paris for the next three days as JSON "
                                      "(city, unit, days, include_hourly, fields)."}]


def schema_variant(i: int) -> dict:
    """SCHEMA with its first property renamed, so each compile sees a new schema."""
    s = json.loads(json.dumps(SCHEMA))
    s["properties"][f"city_{i}"] = s["properties"].pop("city")
    s["required"] = [f"city_{i}" if r == "city" else r for r in s["required"]]
    return s


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------ libraries
# Each backend: setup(tokenizer, ends) -> state; compile(state, schema) -> grammar with .matcher() and .vocab_size.


class Timed:
    """A matcher whose fill and accept calls are timed (the runtime calls nothing else of it per step)."""

    def __init__(self, inner, clock: list[float]):
        self.inner, self.clock = inner, clock

    def fill(self, bitmask, index):
        t = time.perf_counter()
        self.inner.fill(bitmask, index)
        self.clock[0] += time.perf_counter() - t
        self.clock[1] += 1

    def accept(self, token):
        t = time.perf_counter()
        ok = self.inner.accept(token)
        self.clock[0] += time.perf_counter() - t
        return ok

    def accept_all(self, tokens):
        return self.inner.accept_all(tokens)

    @property
    def finished(self):
        return self.inner.finished

    @property
    def error(self):
        return self.inner.error


class TimedGrammar:
    def __init__(self, grammar, clock: list[float]):
        self.grammar, self.clock, self.vocab_size = grammar, clock, grammar.vocab_size

    def matcher(self):
        return Timed(self.grammar.matcher(), self.clock)


class LLGuidance:
    name = "llguidance"

    def setup(self, tokenizer, ends):
        from citi_engine.constrained import _ll_tokenizer

        return _ll_tokenizer(tokenizer)

    def compile(self, tokenizer, state, schema):
        from citi_engine.constrained import compile_grammar, json_grammar

        return compile_grammar(json_grammar(schema), tokenizer)


class _XgrMatcher:
    def __init__(self, compiled):
        import xgrammar as xgr

        self.m = xgr.GrammarMatcher(compiled)

    def fill(self, bitmask, index):
        self.m.fill_next_token_bitmask(bitmask, index)

    def accept(self, token):
        return self.m.accept_token(int(token))

    def accept_all(self, tokens):
        return all(self.m.accept_token(int(t)) for t in tokens)

    @property
    def finished(self):
        return self.m.is_terminated()

    error = None


class _XgrGrammar:
    def __init__(self, compiled, vocab_size):
        self.compiled, self.vocab_size = compiled, vocab_size

    def matcher(self):
        return _XgrMatcher(self.compiled)


class XGrammar:
    name = "xgrammar"

    def setup(self, tokenizer, ends):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer), stop_token_ids=sorted(ends))
        return xgr.GrammarCompiler(info, cache_enabled=False), len(tokenizer)

    def compile(self, tokenizer, state, schema):
        compiler, vocab = state
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        return _XgrGrammar(compiled, vocab)


class _OutlinesMatcher:
    def __init__(self, index):
        from outlines_core import Guide

        self.g = Guide(index)

    def fill(self, bitmask, index):
        row = bitmask[index]
        self.g.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def accept(self, token):
        try:
            self.g.advance(int(token), return_tokens=False)
        except ValueError:
            return False
        return True

    def accept_all(self, tokens):
        return all(self.accept(t) for t in tokens)

    @property
    def finished(self):
        return False  # it stops at the end token its final state allows

    error = None


class _OutlinesGrammar:
    def __init__(self, index, vocab_size):
        self.index, self.vocab_size = index, vocab_size

    def matcher(self):
        return _OutlinesMatcher(self.index)


class OutlinesCore:
    name = "outlines-core"

    def setup(self, tokenizer, ends):
        from outlines_core import Vocabulary

        # Byte-level BPE pieces to the bytes they stand for; special tokens are left out (the end token apart).
        byte_of = _byte_level_alphabet()
        special = set(tokenizer.all_special_ids)
        eos = tokenizer.eos_token_id
        pieces: dict[bytes, list[int]] = {}
        for piece, i in tokenizer.get_vocab().items():
            if i in special or i == eos or any(c not in byte_of for c in piece):
                continue
            pieces.setdefault(bytes(byte_of[c] for c in piece), []).append(i)
        return Vocabulary(eos, pieces), len(tokenizer)

    def compile(self, tokenizer, state, schema):
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        vocabulary, vocab = state
        # No optional whitespace: JSON spelt with ", " and ": " only, as the other two are told.
        return _OutlinesGrammar(Index(build_regex_from_schema(json.dumps(schema), r""), vocabulary), vocab)


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme), as {character: byte}."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return alphabet


BACKENDS = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


# ------------------------------------------------------------------------------------------ measuring


def decode_ms_per_token(req) -> float | None:
    """Time after the first token over the tokens after the first, in ms."""
    n = req.completion_tokens - 1
    if n < 1 or req.time_to_first_token is None:
        return None
    return 1000 * (req.finished_at - req.submitted_at - req.time_to_first_token) / n


def run_round(model, tokenizer, prompt, grammar, batch: int, tokens: int | None) -> list:
    from citi_engine.serving import GenerationRequest, generate

    if grammar is not None:
        reqs = [GenerationRequest(prompt_ids=prompt, max_new_tokens=256, grammar=grammar) for _ in range(batch)]
    else:
        reqs = [GenerationRequest(prompt_ids=prompt, max_new_tokens=tokens, ignore_eos=True) for _ in range(batch)]
    generate(model, tokenizer, reqs)
    return reqs


def measure_library(backend, model, tokenizer, prompt, args) -> dict:
    from citi_engine.generate import stop_token_ids

    ends = stop_token_ids(model, tokenizer)
    t = time.perf_counter()
    state = backend.setup(tokenizer, ends)
    setup_s = time.perf_counter() - t
    compile_s = []
    for i in range(args.compiles):
        t = time.perf_counter()
        backend.compile(tokenizer, state, schema_variant(i)).matcher()
        compile_s.append(time.perf_counter() - t)
    grammar = backend.compile(tokenizer, state, SCHEMA)
    request_ms = None
    if backend.name == "llguidance":
        from citi_engine.constrained import reply_grammar

        times = []
        for i in range(args.compiles):
            tools = [{"type": "function", "function": {"name": f"get_forecast_{i}", "parameters": schema_variant(i)}},
                     {"type": "function", "function": {"name": "get_stock_price", "parameters": {
                         "type": "object", "properties": {"ticker": {"type": "string", "maxLength": 5}},
                         "required": ["ticker"]}}}]
            t = time.perf_counter()
            reply_grammar(tokenizer, tools=tools, tool_choice="required").matcher()
            times.append(time.perf_counter() - t)
        request_ms = 1000 * statistics.median(times)
    out = {"library": backend.name, "version": version(backend.name), "tokenizer_setup_ms": 1000 * setup_s,
           "compile_ms_median": 1000 * statistics.median(compile_s), "compile_ms_first": 1000 * compile_s[0],
           "request_grammar_compile_ms": request_ms, "by_batch": {}}
    for batch in args.batch:
        clock = [0.0, 0]
        timed = TimedGrammar(grammar, clock)
        free_ms, cons_ms, overhead, lengths, texts, valid = [], [], [], [], [], []
        run_round(model, tokenizer, prompt, timed, batch, None)  # warm-up (first masks, caches)
        clock[0], clock[1] = 0.0, 0
        for _ in range(args.rounds):
            cons = run_round(model, tokenizer, prompt, timed, batch, None)
            n = min(r.completion_tokens for r in cons)
            free = run_round(model, tokenizer, prompt, None, batch, n)
            c = statistics.median(x for x in map(decode_ms_per_token, cons) if x is not None)
            f = statistics.median(x for x in map(decode_ms_per_token, free) if x is not None)
            cons_ms.append(c)
            free_ms.append(f)
            overhead.append(c / f - 1)
            lengths.append(n)
            texts.append(cons[0].text)
            valid.append(all(_valid(r.text) for r in cons))
        out["by_batch"][str(batch)] = {
            "rounds": args.rounds, "tokens": statistics.median(lengths),
            "free_ms_per_token": statistics.median(free_ms), "constrained_ms_per_token": statistics.median(cons_ms),
            "overhead": statistics.median(overhead), "mask_ms_per_token": 1000 * clock[0] / max(clock[1], 1),
            "all_valid": all(valid), "example": texts[-1],
        }
    return out


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def load(model_name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_name == "smollm2":
        from citi_engine.models import load_model

        model, tok = load_model("smollm2-135m-instruct", device="cpu", dtype="fp32")
        return model, tok, "SmolLM2-135M-Instruct (built-in Q4_1 GGUF, dequantised to fp32)"
    from tests.inference.conftest import make_small_model_dir

    path = make_small_model_dir(Path(tempfile.mkdtemp()) / "tiny")
    tok = AutoTokenizer.from_pretrained(path)
    return (AutoModelForCausalLM.from_pretrained(path).eval(), tok,
            "tiny test model (tests/inference/conftest.py: 2-layer random Llama, 512-token BPE)")


def render_md(result: dict) -> str:
    lines = ["# Constrained decoding: grammar libraries on our decode loop", "",
             f"Written by `bench/constrained.py` on the **{result['machine']}** ({result['cpu']}), "
             f"{result['threads']} torch thread(s), fp32, torch {result['torch']}, transformers "
             f"{result['transformers']}; Python {result['python']}. Every number is from this run.", "",
             "Each library runs inside `citi_engine.serving.generate` (the inference server's loop) with the same "
             "bitmask application. Compile: one tool-argument JSON schema to a grammar and its first matcher (median of "
             f"{result['compiles']} schemas differing in one property name). Mask: filling the next-token bitmask "
             "and accepting the chosen token, per token. Decode ms/token: time after the first token over the "
             "tokens after the first; free decoding runs the same number of steps from the same prompt (end-of-turn "
             "ignored). Overhead: median over rounds of constrained over free; target <= "
             f"{TARGET:.0%} per token. Mask ms/token is per row; mask / free is the mask time of one "
             "step (every row's) over the free time of that step, the grammar's own share; on a CPU shared with other jobs it is steadier than the overhead, which "
             "compares two timed runs.", "", "Schema:", "", "```json", json.dumps(SCHEMA), "```", ""]
    for m in result["models"]:
        lines += [f"## {m['model']}", "", f"Prompt {m['prompt_tokens']} tokens.", "",
                  "| library | version | tokenizer setup ms | compile ms (median) | batch | tokens | mask ms/token | "
                  "mask / free | free ms/token | constrained ms/token | overhead | valid JSON |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for lib in m["libraries"]:
            if "error" in lib:
                lines.append(f"| {lib['library']} | {lib.get('version') or 'not installed'} | - | - | - | - | - | - "
                             f"| - | - | - | {lib['error']} |")
                continue
            for batch, r in lib["by_batch"].items():
                lines.append(
                    f"| {lib['library']} | {lib['version']} | {lib['tokenizer_setup_ms']:.0f} | "
                    f"{lib['compile_ms_median']:.1f} | {batch} | {r['tokens']:.0f} | {r['mask_ms_per_token']:.3f} | "
                    f"{100 * int(batch) * r['mask_ms_per_token'] / r['free_ms_per_token']:.1f}% | "
                    f"{r['free_ms_per_token']:.2f} | {r['constrained_ms_per_token']:.2f} | {100 * r['overhead']:+.1f}% | "
                    f"{'yes' if r['all_valid'] else 'NO'} |")
        for lib in m["libraries"]:
            if lib.get("request_grammar_compile_ms") is not None:
                lines.append(f"{lib['library']}: a whole `tool_choice: required` grammar for two tools (names and both "
                             f"argument schemas) compiles in {lib['request_grammar_compile_ms']:.1f} ms (median).")
        lines.append("")
    lines += ["## Installing on a CPU-only machine (x86-64, Python 3.11, torch+cpu already there)", ""]
    for name, info in result["install"].items():
        lines.append(f"- **{name}**: {info}")
    lines.append("")
    return "\n".join(lines)


def install_notes() -> dict[str, str]:
    """What each library's wheel requires (from its installed metadata)."""
    notes = {}
    for name in LIBRARIES:
        try:
            reqs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            notes[name] = "not installed"
            continue
        plain = [r for r in reqs if "extra ==" not in r]
        notes[name] = "requires " + (", ".join(f"`{r}`" for r in plain) if plain else "nothing")
    return notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,tiny", help="comma list of smollm2, tiny")
    p.add_argument("--libraries", default=",".join(LIBRARIES), help="comma list of " + ", ".join(LIBRARIES))
    p.add_argument("--rounds", type=int, default=5, help="free/constrained round pairs per configuration")
    p.add_argument("--compiles", type=int, default=5, help="schemas compiled for the compile time")
    p.add_argument("--batch", default="1,4", help="comma list of batch sizes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--machine", default="2-core CPU dev machine", help="name of the machine, for the report")
    p.add_argument("--render", action="store_true", help="measure nothing: rewrite --md from --json")
    p.add_argument("--md", type=Path, default=ROOT / "bench" / "results" / "constrained.md")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "constrained.json")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    if args.render:
        args.md.write_text(render_md(json.loads(args.json.read_text())))
        return 0

    import torch
    import transformers

    from citi_engine.generate import encode_prompt

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "machine": args.machine, "cpu": cpu_name(), "threads": args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "compiles": args.compiles, "schema": SCHEMA, "target_overhead": TARGET, "models": [],
        "install": install_notes(),
    }
    for model_name in args.models.split(","):
        model, tokenizer, description = load(model_name)
        prompt = encode_prompt(tokenizer, PROMPT)
        entry = {"model": description, "prompt_tokens": len(prompt), "libraries": []}
        for lib in args.libraries.split(","):
            print(f"{model_name}: {lib} ...", flush=True)
            try:
                entry["libraries"].append(measure_library(BACKENDS[lib](), model, tokenizer, prompt, args))
            except ImportError as exc:
                entry["libraries"].append({"library": lib, "version": version(lib), "error": f"not usable: {exc}"})
            print(json.dumps(entry["libraries"][-1], indent=1), flush=True)
        result["models"].append(entry)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.md.write_text(render_md(result))
    print(render_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
