"""What holds the router's backbone gate down? A short CPU probe on the built-in model, one routing term at a time.

    python bench/router_probe_cpu.py --out bench/results/router_detach_cpu_check   # about 20 minutes on 2 cores
    python bench/router_probe_cpu.py --settings "balancing loss, means (shipped now);sigmoid;sigmoid, token weight 0.3" \
        --prefix router_probe_sigmoid_cpu --out bench/results/router_detach_cpu_check

SmolLM2-135M-Instruct in fp32 with CITI's MOLoRA on every second component (4 experts, rank 8), the routers and
experts trained together for ``--steps`` AdamW steps at a constant 1e-3 through the job's own loss of a
micro-batch (``citi_engine.train._micro_loss``: cross-entropy on the answers, the token-level routing objective
at ``routing_token_weight`` and the balancing loss at ``routing_beta``), on batches of two tool and two general
examples from ``examples/``. After every ten steps, on held-out examples (4 tool, 6 general): the mean backbone
gate G(x)[0] on the tokens of the general ones and on the positions that write the tool calls, and the KL from the
adapter-disabled model's next-token distribution on the general tokens (how far general behaviour has moved).
Settings, one run each, same seed and batches: the balancing loss off, as the paper sums router weights (the
shipped default), and as per-token means (``routing_balance: mean``); the shipped default without
``routing_detach``; the token-level objective at 1.0, with and without ``routing_detach_input``; and the defaults
since (means, not detached) with one softmax over the backbone and the experts against ``routing_gate: sigmoid``
(the backbone's share a sigmoid of its own logit, the balancing loss among the experts only), at token weight 0.1
and 0.3.

A probe of the training signal, not of quality: no answer is generated and nothing is evaluated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# name: (routing_beta, routing_balance, routing_detach, routing_token_weight, routing_detach_input, routing_gate)
SETTINGS = {
    "no balancing loss (detached)": (0.0, "sum", True, 0.1, False, "softmax"),
    "balancing loss, sums (shipped; detached)": (5e-4, "sum", True, 0.1, False, "softmax"),
    "balancing loss, means (detached)": (5e-4, "mean", True, 0.1, False, "softmax"),
    "balancing loss, sums (shipped, not detached)": (5e-4, "sum", False, 0.1, False, "softmax"),
    "shipped, token weight 1.0": (5e-4, "sum", False, 1.0, False, "softmax"),
    "shipped, token weight 1.0, router input detached": (5e-4, "sum", False, 1.0, True, "softmax"),
    "balancing loss, means (shipped now)": (5e-4, "mean", False, 0.1, False, "softmax"),
    "sigmoid": (5e-4, "mean", False, 0.1, False, "sigmoid"),
    "sigmoid, token weight 0.3": (5e-4, "mean", False, 0.3, False, "sigmoid"),
}


def probe(beta: float, balance: str, detach: bool, token_weight: float, detach_input: bool, gate: str, steps: int,
          seed: int) -> list[dict]:
    """Held-out gates, and the KL from the adapter-disabled model on general tokens, every ten steps of one
    setting."""
    import torch

    from citi_engine.adapter import AdaptersOff, apply_method, backbone_targets, detach_routers, molora_layers
    from citi_engine.components import list_components
    from citi_engine.data.chat_format import encode_example
    from citi_engine.losses import label_positions
    from citi_engine.models import load_model
    from citi_engine.packing import pad_batches
    from citi_engine.train import _micro_loss
    from citi_engine.training.batches import answer_tokens, routing_token_counts

    torch.manual_seed(seed)
    model, tokenizer = load_model("smollm2-135m-instruct")
    model = apply_method(model, "citi", molora=list_components(model)[::2], uco=[], num_experts=4, rank=8, alpha=16,
                         gate=gate)
    detach_routers(model, detach, inputs=detach_input)
    read = lambda name: [json.loads(line) for line in (ROOT / "examples" / name).read_text().splitlines()]  # noqa: E731
    tools, general = read("tools_train.jsonl"), read("general.jsonl")
    encode = lambda examples: [encode_example(tokenizer, e, 1024) for e in examples]  # noqa: E731
    steps_data = [encode(tools[i:i + 2] + general[i:i + 2]) for i in range(0, 12, 2)]
    held = pad_batches(encode(tools[20:24] + general[16:22]), max_tokens=100_000)[0]
    positions, _ = label_positions(held["labels"])
    target = backbone_targets(held["token_kind"], positions, held["token_kind"].reshape(-1)[positions])
    trained = [p for n, p in model.named_parameters() if "molora_" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=1e-3, weight_decay=0.0)

    adapters_off = AdaptersOff(model)

    def gates(step: int) -> dict:
        inputs = {"input_ids": held["input_ids"], "attention_mask": held["attention_mask"]}
        with torch.no_grad():
            tuned = model(**inputs).logits.float().log_softmax(-1)
            g = torch.stack([layer.router_probs["default"][..., 0] for layer in molora_layers(model)])
            with adapters_off():
                base = model(**inputs).logits.float().log_softmax(-1)
            kl = (base.exp() * (base - tuned)).sum(-1)  # KL(base || tuned) per token
        return {"step": step, "general": round(float(g[:, target == 1].mean()), 3),
                "tool_call": round(float(g[:, target == 0].mean()), 3),
                "kl_general": round(float(kl[target == 1].mean()), 4)}

    curve = [gates(0)]
    for step in range(steps):
        examples = steps_data[step % len(steps_data)]
        batch = pad_batches(examples, max_tokens=100_000)[0]
        loss, _, _ = _micro_loss(model, batch, n_answer=answer_tokens(examples), n_examples=len(examples),
                                 n_route=routing_token_counts(examples), device=torch.device("cpu"),
                                 autocast=contextlib.nullcontext(), beta=beta, token_weight=token_weight, delta=0.95,
                                 world_size=1, balance=balance)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 10 == 0:
            curve.append(gates(step + 1))
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for PREFIX.json and PREFIX.md")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default=";".join(SETTINGS),
                   help="SETTINGS' names separated by semicolons (they hold commas); default: all")
    p.add_argument("--prefix", default="router_probe_cpu", help="file names: PREFIX.json, PREFIX.md")
    args = p.parse_args(argv)
    chosen = [name.strip() for name in args.settings.split(";") if name.strip()]
    if not chosen or any(name not in SETTINGS for name in chosen):
        p.error(f"--settings takes names of: {'; '.join(SETTINGS)}; got {args.settings!r}")
    from provenance import commit as provenance_commit

    commit = provenance_commit(short=True) or "unknown"
    runs = {}
    for name in chosen:
        beta, balance, detach, token_weight, detach_input, gate = SETTINGS[name]
        runs[name] = {"routing_beta": beta, "routing_balance": balance, "routing_detach": detach,
                      "routing_token_weight": token_weight, "routing_detach_input": detach_input, "routing_gate": gate,
                      "curve": probe(beta, balance, detach, token_weight, detach_input, gate, args.steps, args.seed)}
        print(name, runs[name]["curve"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.prefix}.json").write_text(json.dumps({"commit": commit, "cpus": os.cpu_count(),
                                                                "steps": args.steps, "runs": runs}, indent=1))
    lines = ["# What holds the backbone gate down: one routing term at a time (CPU probe)", "",
             f"`bench/router_probe_cpu.py` at {commit}, {os.cpu_count()} CPU cores: SmolLM2-135M-Instruct fp32, "
             f"routers and experts trained {args.steps} AdamW steps at 1e-3 through the job's micro-batch loss on "
             "the example data; backbone gate G(x)[0] on held-out examples (general tokens / tool-call positions) "
             "and KL(adapters off || tuned) on the general tokens every ten steps. A probe of the training signal, "
             "not of quality.", "",
             "| setting | " + " | ".join(f"step {c['step']}" for c in next(iter(runs.values()))["curve"]) + " |",
             "|---|" + "---|" * len(next(iter(runs.values()))["curve"])]
    for name, run in runs.items():
        lines.append(f"| {name} | " + " | ".join(f"{c['general']:.3f} / {c['tool_call']:.3f} / {c['kl_general']:.2f}"
                                                  for c in run["curve"]) + " |")
    lines += ["", "Cells: general gate / tool-call gate / KL on general tokens (gate 1 = experts off; the goal is the "
              "general gate high, the tool-call gate low, the KL low)."]
    (args.out / f"{args.prefix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
