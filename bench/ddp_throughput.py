"""Data-parallel speed-up on one host: the same training run on 1 GPU and on N GPUs, started with torchrun.

    python bench/ddp_throughput.py --shape 8b --methods citi_stage2,lora --gpus 1,2 --out $OUT/throughput
    python bench/ddp_throughput.py --smoke --gpus 1,2 --out /tmp/ddp      # CPU (gloo), tiny shape

Each size runs ``torchrun --standalone --nproc_per_node=<n> bench/throughput.py --ddp ...`` in a
fresh process group (NCCL on GPUs, ``NCCL_NVLS_ENABLE=0``); every GPU trains on its own
micro-batches of ~4,096 real tokens, so the global batch grows with the GPU count (weak scaling,
as a job that uses all GPUs of its host runs). Writes ``<tag>_ddp<n>.json`` per size (from
bench/throughput.py) and ``<tag>_ddp.json`` with the speed-up of each size over 1 GPU:
global tokens/s on n GPUs divided by tokens/s on 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import METHODS, run_tag  # noqa: E402  (bench/ is not a package)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8b")
    p.add_argument("--methods", default="citi_stage2", help="comma-separated methods (not importance), one after another")
    p.add_argument("--packing", default="true", choices=("true", "false"))
    p.add_argument("--gpus", default="1,2", help="comma-separated process counts; the first is the reference")
    p.add_argument("--out", default="bench/results/throughput_raw")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--grad-ckpt", default="off", choices=("on", "off"))
    p.add_argument("--timeout-s", type=float, default=240.0, help="kill one torchrun after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU processes (gloo)")
    args = p.parse_args(argv)
    shape = "tiny" if args.smoke else args.shape
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in METHODS or m == "importance"]
    if bad:
        raise SystemExit(f"unknown or unsupported methods {bad}: use some of {[m for m in METHODS if m != 'importance']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for method in methods:
        status |= run_method(args, shape, method, out)
    return status


def run_method(args: argparse.Namespace, shape: str, method: str, out: Path) -> int:
    """Both sizes of one method; writes ``<tag>_ddp.json`` and returns 0 when every size ran."""
    packing = args.packing == "true"
    tag = run_tag(shape, method, packing)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    sizes = [int(n) for n in args.gpus.split(",")]
    results = {}
    for n in sizes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(HERE / "throughput.py"), "--ddp", "--shape", shape, "--method", method,
               "--packing", args.packing, "--out", str(out), "--grad-ckpt", args.grad_ckpt]
        for flag in ("steps", "warmup", "tokens"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag}", str(getattr(args, flag))]
        if args.smoke:
            cmd.append("--smoke")
        log_path = out / f"{tag}_ddp{n}.log"
        started = time.monotonic()
        with open(log_path, "w") as log:
            try:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      timeout=args.timeout_s).returncode
            except subprocess.TimeoutExpired:
                log.write("\nTimeout\n")
                code = -1
        json_path = out / f"{tag}_ddp{n}.json"
        if code == 0 and json_path.is_file():
            results[n] = json.loads(json_path.read_text())
            print(f"{tag} on {n} process(es): {results[n]['tokens_per_s']:,.0f} tok/s "
                  f"({time.monotonic() - started:.0f} s)")
        else:
            print(f"{tag} on {n} process(es): failed ({code}); see {log_path}")
    ref = sizes[0]
    summary = {
        "kind": "ddp", "shape": shape, "method": method, "packing": packing,
        "card": next((r["card"] for r in results.values()), None),
        "runs": {str(n): {k: r.get(k) for k in ("tokens_per_s", "tokens_per_s_per_gpu", "step_s", "peak_gib", "mfu",
                                                "world_size", "attention")} for n, r in results.items()},
        "reference_gpus": ref,
        "speedup": {str(n): results[n]["tokens_per_s"] / results[ref]["tokens_per_s"]
                    for n in results if ref in results},
        "failed": [n for n in sizes if n not in results],
        "status": "ok" if len(results) == len(sizes) else "incomplete",
    }
    (out / f"{tag}_ddp.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({tag: summary["speedup"]}))
    return 0 if summary["status"] == "ok" else 1

if __name__ == "__main__":
    sys.exit(main())
