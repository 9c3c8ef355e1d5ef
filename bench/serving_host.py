"""Host time of the serving loop's per-row bookkeeping in one decode step: the reply's text decoded again from all
of its ids at every step (the runtime before the eleventh session) against the text grown a token at a time.

    python bench/serving_host.py --out bench/results/serving_host_cpu

Why: on an H100 the 1B shape with CUDA graphs decodes a token in 2.99 ms alone but 4.86 ms a request at 16
concurrent (bench/results/inference.md), although one step reads the weights once for all rows. The GPU part of a
step does not grow with the rows; what the host does for each row after it does: take the token, end the row on a
stop token or string, and stream the new text (``citi_engine.serving._advance``). Decoding a reply's ids again at
every step costs each row time in proportion to its length. This script times exactly that function over replies of
``--tokens`` tokens for ``--rows`` rows a step, with the SmolLM2 tokenizer and the server's stop strings and
streaming callback, both ways; it needs no model and no GPU. What it does not say: how much of the GPU run's gap
this closes (that needs the GPU run again).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import provenance  # noqa: E402

from citi_engine.files import write_json_atomic  # noqa: E402


def step_ms(tok, ids: list[int], rows: int, incremental: bool, rounds: int) -> float:
    """Median over ``rounds`` of the mean host time of one decode step's bookkeeping for ``rows`` rows."""
    from citi_engine.serving import GenerationRequest, _advance, _Row

    times = []
    for _ in range(rounds):
        batch = []
        for _ in range(rows):
            req = GenerationRequest(prompt_ids=[1], max_new_tokens=len(ids) + 1, stop=["</tool_call>", "\nUser:"],
                                    on_text=lambda delta: None)
            row = _Row(req, [], tok, "cpu")
            if not incremental:
                row._stream = None  # every step decodes all of the row's ids, as before
            batch.append(row)
        start = time.perf_counter()
        for token in ids:
            now = time.perf_counter()
            for row in batch:
                _advance(row, token, set(), now)
        times.append((time.perf_counter() - start) / len(ids) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for serving_host.json and serving_host.md")
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--tokens", type=int, default=128, help="reply length (the inference benchmark's 128)")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from citi_engine.testing import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    # A reply of ordinary text (the tokenizer's own ids of a long answer), cut or repeated to --tokens ids.
    text = ("The weather in Paris today is mild, with light rain in the morning and sun after noon. "
            "Temperatures stay between 12 and 17 degrees; wind from the west at 15 km/h. ") * 8
    ids = (tok.encode(text) * 4)[:args.tokens]
    random.Random(0).shuffle(ids[len(ids) // 2:])  # the second half less regular, as sampled replies are
    rows = []
    for n in args.rows:
        full = step_ms(tok, ids, n, incremental=False, rounds=args.rounds)
        grown = step_ms(tok, ids, n, incremental=True, rounds=args.rounds)
        rows.append({"rows": n, "full_decode_ms_per_step": round(full, 4), "incremental_ms_per_step": round(grown, 4),
                     "saved_ms_per_step": round(full - grown, 4)})
        print(rows[-1], flush=True)
    commit = provenance.commit(short=True) or "unknown"
    doc = {"cpu": provenance.cpu_name(), "cores": os.cpu_count(), "commit": commit, "tokens": args.tokens,
           "rounds": args.rounds, "results": rows}
    write_json_atomic(args.out / "serving_host.json", doc)
    lines = ["# The serving loop's host time per decode step: reply text decoded again against grown", "",
             f"`bench/serving_host.py` on {doc['cpu']} ({doc['cores']} cores), commit {commit}; replies of "
             f"{args.tokens} tokens, SmolLM2's tokenizer, the server's stop strings and a streaming callback; "
             f"median over {args.rounds} rounds of the mean over a reply's steps. No model and no GPU: this is "
             "the host's share of a step only.", "",
             "| rows a step | decoded again, ms a step | grown a token at a time, ms a step | saved, ms a step |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['rows']} | {r['full_decode_ms_per_step']:.3f} | {r['incremental_ms_per_step']:.3f} | "
              f"{r['saved_ms_per_step']:.3f} |" for r in rows]
    (args.out / "serving_host.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'serving_host.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
