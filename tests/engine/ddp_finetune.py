"""Run by tests/engine/test_distributed_train.py under ``torchrun --nproc-per-node=2`` (CPU, gloo).

``python ddp_finetune.py SPEC.json``: every process runs ``finetune(spec["config"])`` and writes what
it got to ``<results>/rank<N>.json``. With ``spec["cancel_config"]`` it then runs a second job, where
only rank 1 is told to cancel (once rank 0 has reported training step 2), and records how each
process ended. The process group is set up here, once, and finetune must leave it alone (joining
torchrun's group again after leaving it can hang in torch's rendezvous store).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    results = Path(spec["results"])
    rank = int(os.environ["RANK"])
    import torch.distributed as dist

    from citi_engine.distributed import init_distributed
    from citi_engine.errors import Cancelled
    from citi_engine.train import CITI_STAGES, FinetuneConfig, finetune

    init_distributed(device="cpu")

    events: list[dict] = []
    result = finetune(FinetuneConfig.from_dict(spec["config"]), on_event=events.append)
    record = {
        "rank": rank, "steps": result.steps, "trained_tokens": result.trained_tokens,
        "stage_steps": result.stage_steps, "sha256": result.trained_sha256, "selected_components": result.selected_components,
        "progress": [e["step"] for e in events if e["type"] == "progress" and e["stage"] in CITI_STAGES],
        "events": len(events),
    }

    record["group_left_alone"] = dist.is_initialized()
    if spec.get("cancel_config"):
        flag = results / "cancel-requested"
        steps: list[int] = []

        def on_event(event: dict) -> None:
            if event["type"] == "progress" and event["stage"] in CITI_STAGES:
                steps.append(event["step"])
                if event["step"] == 2:
                    flag.touch()

        try:
            finetune(FinetuneConfig.from_dict(spec["cancel_config"]), on_event=on_event,
                     should_cancel=lambda: rank == 1 and flag.exists())
            record["cancelled"] = False
        except Cancelled:
            record["cancelled"] = True
        record["cancel_progress"] = steps
        record["group_left_alone"] &= dist.is_initialized()
    dist.destroy_process_group()

    (results / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
