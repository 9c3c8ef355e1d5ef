"""The fine-tuning recipe. One door, :func:`finetune`, which runs the steps of :class:`FinetuneRecipe`
in order; the recipe holds the run's state and reads top to bottom, one method per step:

    step         what                                                            FinetuneRecipe method
    1. data      validate the files, hold out a test split, tokenise (no model)  setup_data
    2. budget    refuse a step or token budget too small for one step per stage  check_budget
    3. model     load the base model                                             setup_model
    4. citi      general replay (when the job brings no general data)            select_components
                 -> component importance -> the MOLoRA and UCO components
    5. method    MOLoRA + UCO (citi), LoRA (lora) or nothing (full);             setup_method
                 trained weights kept in fp32
    6. stages    citi: router pre-training -> MOLoRA improvement -> UCO;         train, and train_stage
                 lora/full: one stage "train". Each stage: a fresh AdamW,        (the loop), save_checkpoint
                 cosine schedule with warm-up, checkpoints
    7. save      adapter, importance.json/png, citi_job.json, model card         save
    8. evaluate  tool accuracy on the held-out tool tests, general retention     evaluate
                 (size-limited)

Words: a *stage* is a training stage (``router_pretraining``, ``molora``, ``uco``, ``train``); a *phase*
is any part of a run (``validating``, ``loading``, ``replay``, ``importance``, a stage, ``saving``,
``eval``), reported in each event's ``stage`` field. :class:`RunContext` carries events, cancellation
and the clock of one run.

Loss: cross-entropy on assistant tokens only; citi adds ``beta * routing loss`` (the routing loss
needs each example's task type, so the mixed data holds tool and general examples). Mixed
precision: the frozen model may run in bf16 on GPU, but every trained tensor is fp32 and the
forward runs under ``torch.autocast(bf16)``; on CPU everything is fp32.

Batches: a step is ``batch_size x gradient_accumulation_steps`` examples, padded in micro-batches of
``batch_size``, or packed into rows of at most ``pack_tokens`` tokens (``packing``; on by default on
GPUs with a checked variable-length attention kernel). Either way the loss of a step is the same:
cross-entropy summed over all its answer tokens divided by their number, plus ``beta`` times each
micro-batch's routing loss weighted by its share of the step's examples (the routing loss sums the
router weights per example, over ``attention_mask`` when padded and ``sequence_mask`` when packed,
and takes each example's task type).

Data-parallel: started by ``torchrun`` (``WORLD_SIZE`` > 1), every process runs this recipe on a
copy of the model. A step keeps its examples; each process trains its share of them
(:func:`~citi_engine.training.batches.rank_share`) and DDP averages the gradients, so the weights
follow the same path as in one process and steps and tokens count the whole job. Replay and
importance run on rank 0 and are shared; cancel, budget ends and the time plan are agreed on by all
processes every step; only rank 0 writes checkpoints, the adapter and events, and evaluates.

Progress and cancellation reach the recipe as a callback and a flag (``on_event``,
``should_cancel``); it knows nothing of queues or HTTP. ``should_cancel`` is checked before every
step of every phase (scoring, replay, training, evaluation), so a cancel takes effect within one step
(with several processes: on all of them, when any one of them sees it).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from citi_engine.adapter import (
    apply_method,
    backbone_targets,
    detach_routers,
    molora_layers,
    routing_loss,
    save_adapter,
    set_trainable,
    token_routing_loss,
    write_calibration,
)
from citi_engine.budget import RunClock, StagePlan, check_budget, plan_stages
from citi_engine.data.augment import build_negatives, mask_some, unrelated_tool_lists
from citi_engine.data.chat_format import encode_example
from citi_engine.data.schemas import ExampleKind, Problem, TaskType, kind_of, task_type_for_kind, task_type_of
from citi_engine.data.validate import check_lengths, validate_jsonl
from citi_engine.distributed import (
    DistInfo,
    LossModule,
    any_rank,
    broadcast_tensors,
    cleanup,
    gather_objects,
    init_distributed,
    is_initialized,
    max_over_ranks,
    run_on_main,
    sum_over_ranks,
    tensors_sha256,
    wrap_ddp,
)
from citi_engine.errors import Cancelled, DataValidationError, TrainingDiverged
from citi_engine.evaluate import evaluate_adapter
from citi_engine.evaluate.tool_eval import load_tool_cases
from citi_engine.generate import model_device
from citi_engine.importance import ImportanceResult, compute_importance
from citi_engine.losses import Teacher, answer_losses
from citi_engine.models import load_model, load_tokenizer
from citi_engine.packing import VARLEN_ATTENTION, enable_varlen_attention, to_device
from citi_engine.replay import build_replay
from citi_engine.specs import resolve_model_spec
from citi_engine.training.batches import (
    StageOrder,
    answer_tokens,
    count_tokens,
    natural_steps,
    rank_share,
    routing_token_counts,
    sample_indices,
    split_test,
    step_batches,
)
from citi_engine.training.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from citi_engine.training.config import (
    BASELINE_STAGES,
    CITI_STAGES,
    Budget,
    ComponentsConfig,
    FinetuneConfig,
    Hyperparameters,
)
from citi_engine.training.profiling import stage_profiler

__all__ = [
    "BASELINE_STAGES",
    "CITI_STAGES",
    "Budget",
    "ComponentsConfig",
    "FinetuneConfig",
    "FinetuneRecipe",
    "FinetuneResult",
    "Hyperparameters",
    "RunContext",
    "TrainState",
    "accumulate_gradients",
    "finetune",
    "lr_factor",
    "run_importance",
    "step_loss_module",
]

EventFn = Callable[[dict], None]
CancelFn = Callable[[], bool]

# Example sets the engine builds itself (a too-long one is dropped or cut, never reported to the user).
BUILT_SETS = ("replay", "negatives")
# Steps timed before a time budget is turned into steps (the first one includes warm-up costs).
SPEED_PROBE_STEPS = 3
# How long a data-parallel process waits in a collective for the others before the job fails: rank 0
# alone builds the replay data, scores importance and writes checkpoints while the others wait
# (minutes on a large model), and a process stuck for longer will not come back.
DIST_TIMEOUT_S = 1800.0


@dataclass
class FinetuneResult:
    """What a finished run produced. ``selected_components`` holds the ``molora`` and ``uco`` lists (empty for
    baselines)."""

    adapter_dir: str
    trained_tokens: int
    steps: int
    selected_components: dict[str, list[str]]
    report_path: str | None = None
    stage_steps: dict[str, int] = field(default_factory=dict)
    final_loss: float | None = None
    # Data-parallel runs only: SHA-256 of every trained tensor, checked equal on all processes.
    trained_sha256: str | None = None


# ----------------------------------------------------------------------------------------- the recipe


def finetune(
    cfg: FinetuneConfig, on_event: EventFn | None = None, should_cancel: CancelFn | None = None
) -> FinetuneResult:
    """Run a fine-tuning job end to end (see the module docstring); resume from ``out_dir/checkpoints``.

    Raises :class:`DataValidationError` (every problem listed) for bad data, :class:`BudgetError`
    for a budget too small (before any model is loaded), :class:`Cancelled` when ``should_cancel()``
    turns true, :class:`ModelSpecError` for a model that cannot be loaded.

    Under ``torchrun`` every process calls this; it joins the process group (or uses the caller's),
    and every process returns the same steps and tokens. Only rank 0 calls ``on_event``, writes
    files and evaluates (``report_path`` is None elsewhere).
    """
    owns_group = not is_initialized()
    dist = init_distributed(device=cfg.device, timeout_s=DIST_TIMEOUT_S)
    recipe = FinetuneRecipe(cfg, on_event, should_cancel, dist=dist)
    recipe.setup_data()
    recipe.check_budget()
    recipe.setup_model()
    recipe.select_components()
    recipe.setup_method()
    recipe.train()
    if dist.enabled:
        recipe.agree_on_weights()  # the last collective of the run
        if owns_group:
            cleanup(dist)
        if dist.rank != 0:
            return recipe.result()
    recipe.save()
    recipe.evaluate()
    result = recipe.result()
    recipe.ctx.emit("done", "saving", step=recipe.plan.total_steps, total_steps=recipe.plan.total_steps,
                    loss=result.final_loss, message=f"adapter saved to {recipe.out_dir}")
    return result


class FinetuneRecipe:
    """One fine-tuning run, its state on the object; :func:`finetune` calls the steps in order.

    Each method is one step of the module docstring and reads and writes the attributes set in
    ``__init__``: the data (``tool``, ``general``, ``pool``), the model and how it runs (``device``,
    ``frozen_dtype``, ``packing``), the citi selection (``replay``, ``importance``, ``selected_components``), and
    where training is (``plan``, ``state``). ``__init__`` loads nothing; it finds the checkpoint to
    resume from (rank 0 writes them, every process reads them).
    """

    def __init__(self, cfg: FinetuneConfig, on_event: EventFn | None = None, should_cancel: CancelFn | None = None,
                 *, dist: DistInfo | None = None):
        self.cfg = cfg
        self.hp = cfg.hyperparameters
        self.dist = dist or DistInfo()
        self.is_main = self.dist.rank == 0  # the one process that writes checkpoints, the adapter and events
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.resume = latest_checkpoint(self.ckpt_root)
        if self.resume is not None:
            _check_same_job(self.resume, cfg)
        self.ctx = RunContext(on_event, should_cancel,
                              RunClock(self.resume.meta["elapsed_s"] if self.resume else 0.0), dist=self.dist)
        self.stages = list(cfg.stages)
        self.per_step = self.hp.batch_size * self.hp.gradient_accumulation_steps  # examples in one step
        # 1. data
        self.data: _Data | None = None
        self.tool: list[dict] = []
        self.general: list[dict] = []
        # 3. model
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        self.frozen_dtype = torch.float32
        self.pad_id = 0
        self.packing = False
        self.attention_before: str | None = None
        # 4. citi
        self.replay: list[dict] = []
        self.gen_s_per_item: float | None = None
        self.importance: Any = None
        self.selected_components: dict[str, list[str]] = {"molora": [], "uco": []}
        # 5. method
        self.trainable: dict[str, Any] = {"by_stage": {}, "names": [], "params": {}}
        self.teacher: Teacher | None = None
        # 6. stages
        self.pool: list[dict] = []
        self.plan: StagePlan | None = None
        self.state = TrainState()
        self.reserve_s = 0.0  # seconds a time budget keeps back for saving and evaluation
        self.stage_losses: dict[str, float | None] = {}
        # 7-8. after training
        self.trained_sha256: str | None = None
        self.report_path: str | None = None
        if self.resume is not None:
            self.ctx.message("validating", f"resuming from checkpoint {self.resume.path.name}")

    # 1. Data, before any model: every problem of every file at once.
    def setup_data(self) -> None:
        """Validate every file, hold out the test split, tokenise (the tokenizer only, no model yet)."""
        self.data, self.tool, self.general = _prepare_data(self.cfg, self.ctx)

    # 2. Budget: a hopeless step or token budget is refused before the model is loaded.
    def check_budget(self) -> None:
        """Raise :class:`BudgetError` for a step or token budget too small for one step per stage."""
        pool = self.tool + (self.general if self.cfg.uses_general_data else [])
        tokens_per_step = self.per_step * sum(len(e["input_ids"]) for e in pool) / len(pool)
        check_budget(self.cfg.budget, n_stages=len(self.stages), tokens_per_step=tokens_per_step,
                     stage_names=self.stages)

    # 3. Model.
    def setup_model(self) -> None:
        """Load the base model on this process's device and choose padded or packed rows."""
        cfg = self.cfg
        self.ctx.phase("loading")
        self.ctx.check_cancel("loading")
        self.model, self.tokenizer = load_model(cfg.model, device=self.dist.device if self.dist.enabled else cfg.device,
                                                dtype=cfg.dtype, model_dirs=cfg.model_dirs)
        self.device = next(self.model.parameters()).device
        self.frozen_dtype = self.model.get_input_embeddings().weight.dtype
        self.pad_id = _pad_id(self.tokenizer)
        self.ctx.check_cancel("loading")
        self.packing, self.attention_before = self._choose_packing()

    # 4. citi: general data (replay when the job brought none), importance, component selection.
    def select_components(self) -> None:
        """Build the replay data and choose the MOLoRA and UCO components (citi; baselines choose none).

        A resumed job reads all three from its checkpoint instead of redoing them. With several
        processes rank 0 does both and shares the results (and any error, a cancel included).
        """
        cfg, ctx = self.cfg, self.ctx
        if self.resume is not None:
            self.replay, self.gen_s_per_item, self.importance = _restore_prepared(self.resume, cfg)
        elif cfg.uses_general_data and not self.general:
            self.replay, self.gen_s_per_item = run_on_main(
                lambda: _build_replay(ctx, cfg, self.model, self.tokenizer, self.data.tool), self.dist)
        if self.replay:
            self.general = _encode(self.tokenizer, self.replay, None, self.hp.max_length, "replay")
        if cfg.method == "citi" and self.importance is None:
            general_name = "replay" if self.replay else "general"
            self.importance = run_on_main(
                lambda: _score_components(ctx, cfg, self.model, self.tokenizer, _calls_only(self.tool), self.general,
                                          general_name, packing=self.packing), self.dist)
        if self.importance is not None:
            self.selected_components = {"molora": list(self.importance.molora), "uco": list(self.importance.uco)}

    # 5. Method: adapters on the chosen components; every tensor any stage trains kept in fp32.
    def setup_method(self) -> None:
        """Apply MOLoRA + UCO, LoRA or nothing, keep every trained tensor in fp32, and build the teacher.

        General answers trained towards the frozen base (general_loss kl) need a teacher: the model
        itself with its adapters off, or for full fine-tuning an untouched copy of the base taken now.
        """
        cfg, c = self.cfg, self.cfg.components
        soft_targets = self.hp.general_loss == "kl" and cfg.uses_general_data and bool(self.general)
        frozen = _frozen_copy(self.model) if soft_targets and cfg.method == "full" else None
        torch.manual_seed(cfg.seed)
        self.model = apply_method(self.model, cfg.method, molora=self.selected_components["molora"],
                                  uco=self.selected_components["uco"], num_experts=c.num_experts, rank=c.rank, alpha=c.alpha,
                                  lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, gate=self.hp.routing_gate)
        self.trainable = _fp32_trainables(self.model, cfg)
        self.teacher = Teacher(self.model, frozen) if soft_targets else None
        for stage in self.stages:
            names = self.trainable["by_stage"][stage]
            n = sum(self.trainable["params"][name].numel() for name in names)
            self.ctx.message(stage, f"stage {stage} trains {n:,} parameters in {len(names)} tensors")

    # 6. Stages over one pool of examples (citi: tool + general; baselines: tool only by default).
    def train(self) -> None:
        """Plan the stages (or take the checkpoint's plan and position) and train them one after another."""
        cfg, resume = self.cfg, self.resume
        self.pool = self.tool + (self.general if cfg.uses_general_data else [])
        tokens_per_step = self.per_step * sum(len(e["input_ids"]) for e in self.pool) / len(self.pool)
        if resume is not None:
            self.plan = StagePlan.from_dict(resume.meta["plan"])
            self.state.stage_index, self.state.stage_step = resume.position
            self.state.global_step = int(resume.meta["global_step"])
            self.state.tokens = int(resume.meta["trained_tokens"])
            _load_tensors(self.model, self.trainable, resume)
            resume.restore_rng()
        else:
            natural = [natural_steps(len(self.pool), e, self.per_step) for e in cfg.stage_epochs()]
            self.plan = plan_stages(self.stages, cfg.stage_epochs(), natural, cfg.budget,
                                    tokens_per_step=tokens_per_step)
        # Every process starts from rank 0's weights (the same seed made them equal already; this makes sure).
        broadcast_tensors([self.trainable["params"][n] for n in self.trainable["names"]], self.dist)
        if resume is None:
            self.save_checkpoint(kind="boundary")  # scoring and replay are not redone after a crash
        self.reserve_s = self._time_reserved_after_training()
        first_stage = self.state.stage_index
        resumed_optimizer = resume.optimizer_state() if resume is not None and not resume.is_boundary else None
        for si in range(first_stage, len(self.stages)):
            self.stage_losses[self.stages[si]] = self.train_stage(
                si, optimizer_state=resumed_optimizer if si == first_stage else None)
            self.state.stage_index, self.state.stage_step = si + 1, 0
            self.save_checkpoint(kind="boundary")
        if self.attention_before is not None:  # the adapter and evaluation see the model as it was loaded
            _base_model(self.model).set_attn_implementation(self.attention_before)

    def train_stage(self, stage_index: int, optimizer_state: dict | None = None) -> float | None:
        """Train stage ``stage_index`` of ``plan`` from ``state.stage_step`` to its end; return its last loss.

        Only the stage's parameters train; a fresh AdamW, unless ``optimizer_state`` resumes one. The stage
        ends after its planned steps, or earlier when the job's tokens or time reach the stage's share
        (never before its first step). With ``packing`` each step is laid out in packed rows instead of
        padded micro-batches; with several processes each trains its share of every step under DDP, built
        here because DDP reduces what requires grad when it is built. ``teacher`` gives the soft targets
        of general answers.
        """
        cfg, hp, plan, state, ctx, dist = self.cfg, self.hp, self.plan, self.state, self.ctx, self.dist
        name = plan.names[stage_index]
        ctx.phase(name)
        set_trainable(self.model, _adapter_stage(cfg.method, name))
        params = [p for p in self.model.parameters() if p.requires_grad]
        peak_lr = cfg.stage_lrs()[stage_index]
        optimizer = torch.optim.AdamW(params, lr=peak_lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: lr_factor(k, plan.steps[stage_index], hp.warmup_ratio)
        )
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state["optimizer"])
            scheduler.load_state_dict(optimizer_state["scheduler"])
        order = StageOrder(len(self.pool), seed=cfg.seed, stage_index=stage_index, examples_per_step=self.per_step)
        with_routing = cfg.method == "citi"
        if with_routing:
            detach_routers(self.model, hp.routing_detach, inputs=hp.routing_detach_input)
        step_module = step_loss_module(self.model, cfg, routing_loss=routing_loss if with_routing else None,
                                       device=self.device, frozen_dtype=self.frozen_dtype, dist=dist,
                                       teacher=self.teacher)
        pack_tokens = _pack_tokens(cfg) if self.packing else None
        profiler = stage_profiler(name, self.device, self.is_main)  # None unless CITI_PROFILE_DIR is set
        self.model.train()
        loss = None
        timed: list[float] = []
        while state.stage_step < plan.steps[stage_index]:
            examples = [self.pool[i] for i in order.indices(state.stage_step)]
            n_tokens = count_tokens(examples)
            spent = state.stage_step > 0 and _share_spent(plan, stage_index, state.tokens + n_tokens,
                                                          ctx.clock.elapsed())
            # One collective: every process stops at the same step when any one reaches its share or sees a cancel.
            spent, cancel = any_rank([spent, ctx.cancel_requested()], dist)
            if spent:
                plan.steps[stage_index] = state.stage_step  # the budget ended this stage early
                break
            if cancel:
                raise Cancelled(f"the job was cancelled during stage {name}")
            lr = optimizer.param_groups[0]["lr"]
            t0 = time.monotonic()
            mine = rank_share(examples, rank=dist.rank, world_size=dist.world_size, micro_size=hp.batch_size,
                              balance_tokens=self.packing)
            micro = step_batches(mine, micro_size=hp.batch_size, pad_id=self.pad_id, pack_tokens=pack_tokens)
            with profiler.step(state.stage_step) if profiler else contextlib.nullcontext():
                loss, rloss = _optimizer_step(
                    step_module, micro, optimizer, scheduler, params, n_answer=answer_tokens(examples),
                    n_examples=len(examples), n_route=routing_token_counts(examples),
                    max_grad_norm=hp.max_grad_norm, dist=dist,
                )
            if not with_routing:
                rloss = None
            step_s = time.monotonic() - t0
            state.stage_step += 1
            state.global_step += 1
            state.tokens += n_tokens
            state.loss, state.routing_loss = loss, rloss
            timed.append(step_s)
            state.timed_steps += 1
            if cfg.budget.max_seconds is not None and not plan.time_fitted and (
                state.timed_steps >= SPEED_PROBE_STEPS or state.stage_step >= plan.steps[stage_index]
            ):
                # Every process fits the same plan: the slowest speed and the latest clock of them all.
                sps, now_s = max_over_ranks([_seconds_per_step(timed), ctx.clock.elapsed()], dist)
                plan.fit_to_time(stage_index=stage_index, steps_done_in_stage=state.stage_step,
                                 seconds_per_step=sps, now_s=now_s, deadline_s=cfg.budget.max_seconds - self.reserve_s)
                ctx.message(name, f"time budget: {plan.total_steps} steps in all "
                                  f"({', '.join(f'{n} {s}' for n, s in zip(plan.names, plan.steps, strict=True))})")
            sps = _seconds_per_step(timed)
            remaining = plan.total_steps - state.global_step
            ctx.emit("progress", name, step=state.global_step, total_steps=plan.total_steps, loss=loss,
                     routing_loss=rloss, lr=lr, tokens_per_s=n_tokens / max(step_s, 1e-9), eta_s=remaining * sps)
            if (cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0
                    and state.stage_step < plan.steps[stage_index]):
                self.save_checkpoint(kind="periodic", optimizer_state={"optimizer": optimizer.state_dict(),
                                                                       "scheduler": scheduler.state_dict()})
        if profiler is not None:
            profiler.finish()  # a stage shorter than the profiled steps still writes what it profiled
        optimizer.zero_grad(set_to_none=True)
        if dist.enabled:
            # The next stage builds its own DDP: this one's gradient hooks must be gone before it does.
            del step_module
            gc.collect()
        return loss

    def save_checkpoint(self, *, kind: str, optimizer_state: dict | None = None) -> None:
        """Write a checkpoint of the current position (rank 0 only; see :mod:`citi_engine.training.checkpoint`).

        ``boundary`` between stages (and once before the first, so scoring and replay are not redone),
        ``periodic`` within a stage with the optimizer's state.
        """
        if not self.is_main:
            return
        meta = {
            "kind": kind,
            "stage_index": self.state.stage_index,
            "stage_step": self.state.stage_step,
            "global_step": self.state.global_step,
            "trained_tokens": self.state.tokens,
            "loss": self.state.loss,
            "routing_loss": self.state.routing_loss,
            "elapsed_s": self.ctx.clock.elapsed(),
            "plan": self.plan.to_dict(),
            "selected_components": self.selected_components,
            "gen_s_per_item": self.gen_s_per_item,
            "config": self.cfg.to_dict(),
        }
        json_files = {"importance.json": self.importance.to_json()} if self.importance is not None else {}
        save_checkpoint(self.ckpt_root, meta=meta, tensors=self.trainable["params"], optimizer_state=optimizer_state,
                        json_files=json_files, jsonl_files={"replay.jsonl": self.replay} if self.replay else None)

    def agree_on_weights(self) -> None:
        """Data-parallel: check every process ended with the very same trained tensors; keep their SHA-256."""
        self.trained_sha256 = _agreed_weights(self.trainable, self.dist)

    # 7. Save the adapter, what chose its components, and how to load it.
    def save(self) -> None:
        """The adapter, importance.json/png, citi_job.json and the model card, in ``out_dir``."""
        self.ctx.phase("saving")
        self.model.eval()
        save_adapter(self.model, self.out_dir, metadata=self.cfg.to_dict())
        if self.hp.call_threshold is not None:
            write_calibration(self.out_dir, self.hp.call_threshold, source="the job's call_threshold")
        if self.importance is not None:
            self.importance.save(self.out_dir)
        _write_model_card(self.out_dir, self.cfg, self.selected_components, self.stage_steps, self.state.tokens)

    # 8. Evaluate on the held-out tool tests (and general probes), within the budget.
    def evaluate(self) -> None:
        """Tool accuracy on the held-out tests and general retention, written next to the adapter (report.json/.md).

        Size-limited by ``eval_examples`` / ``eval_probes`` / ``eval_humaneval``; under a time budget the
        limits shrink to what the time left affords, and evaluation is skipped when none is left.
        """
        cfg, hp, ctx, data = self.cfg, self.hp, self.ctx, self.data
        if not _will_evaluate(cfg, data):
            ctx.message("eval", "no tool test set (validation_file, or a test split of the training file) or "
                                "eval_examples=0: evaluation skipped")
            return
        out_dir = self.out_dir
        test_cases: Any = cfg.validation_file
        if not cfg.validation_file:
            test_file = out_dir / "test_split.jsonl"  # kept, so `citi eval` can rerun on the same split
            test_file.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in data.test))
            test_cases = str(test_file)
        test_limit, probe_limit, humaneval_limit = hp.eval_examples, hp.eval_probes, hp.eval_humaneval
        if cfg.budget.max_seconds is not None:
            left = cfg.budget.max_seconds - ctx.clock.elapsed()
            if left <= 0:
                ctx.message("eval", "the time budget is spent: evaluation skipped (run `citi eval` on the adapter later)")
                return
            if self.gen_s_per_item:
                wanted = _eval_case_count(cfg, data) + 2 * probe_limit
                scale = min(1.0, left / max(wanted * self.gen_s_per_item, 1e-9))
                test_limit = max(1, int(test_limit * scale))
                probe_limit = int(probe_limit * scale)
                humaneval_limit = int(humaneval_limit * scale)
        ctx.phase("eval")
        base_model = None
        if cfg.method == "full" and probe_limit > 0:  # retention needs the untouched base beside the tuned model
            base_model, _ = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, model_dirs=cfg.model_dirs)

        def forward_event(event: dict) -> None:
            event = dict(event)
            ctx.emit(event.pop("type", "message"), "eval", **{k: v for k, v in event.items() if k != "stage"})

        report = evaluate_adapter(
            self.model, self.tokenizer, base_model, test_cases, None if probe_limit > 0 else [], out_dir,
            batch_size=generation_batch_size(hp, self.model), max_new_tokens=hp.eval_max_new_tokens,
            retention_max_new_tokens=min(128, hp.eval_max_new_tokens), test_limit=test_limit,
            probe_limit=probe_limit or None, humaneval=humaneval_limit > 0, humaneval_limit=humaneval_limit or None,
            metadata={"model": cfg.model, "method": cfg.method, "adapter": str(out_dir)},
            should_cancel=ctx.should_cancel, on_event=forward_event,
            calibrate_calls=hp.call_threshold is None, seed=cfg.seed, decode=hp.generation_decode,
        )
        self.report_path = str(out_dir / "report.json")
        calibration = report.get("calibration")
        if calibration:
            write_calibration(out_dir, calibration["threshold"], source="chosen on the job's held-out tool examples",
                              **{k: v for k, v in calibration.items() if k != "threshold"})

    @property
    def stage_steps(self) -> dict[str, int]:
        """Steps each stage trained (its planned steps, or fewer when a budget ended it)."""
        return dict(zip(self.plan.names, self.plan.steps, strict=True))

    def result(self) -> FinetuneResult:
        """What this run produced so far (after :meth:`train`; ``report_path`` after :meth:`evaluate`)."""
        final_loss = next((v for v in reversed(self.stage_losses.values()) if v is not None), None)
        return FinetuneResult(adapter_dir=str(self.out_dir), trained_tokens=self.state.tokens,
                              steps=self.plan.total_steps, selected_components=self.selected_components, report_path=self.report_path,
                              stage_steps=self.stage_steps, final_loss=final_loss, trained_sha256=self.trained_sha256)

    def _choose_packing(self) -> tuple[bool, str | None]:
        """Whether this job packs its rows, and the attention implementation to put back after training.

        Automatic (``packing`` None): packed on CUDA in bf16 when the variable-length flash kernel
        passes its check on every process; padded otherwise (a packed row under plain SDPA gets a dense
        block-diagonal mask, whose cost grows with the square of the row, and the flash kernel takes
        16-bit inputs only). ``true`` packs anyway.
        """
        wanted = self.hp.packing
        model, device = self.model, self.device
        half = model.get_input_embeddings().weight.dtype in (torch.bfloat16, torch.float16)
        if wanted is False or (wanted is None and not (device.type == "cuda" and half)):
            return False, None
        base = _base_model(model)
        before = str(base.config._attn_implementation)
        attention = enable_varlen_attention(model) if device.type == "cuda" else before
        varlen = attention.startswith(VARLEN_ATTENTION)
        restore = before if attention != before else None
        if wanted is None:
            (missing,) = any_rank([not varlen], self.dist)  # every process decides alike, or DDP would hang
            if missing:
                if restore is not None:
                    base.set_attn_implementation(before)
                reason = getattr(base, "citi_varlen_skipped", None) or "another process has no usable kernel"
                self.ctx.message("loading", f"padded batches: no checked variable-length attention kernel ({reason})")
                return False, None
        self.ctx.message("loading", f"packed rows of at most {_pack_tokens(self.cfg):,} tokens, attention {attention}")
        return True, restore

    def _time_reserved_after_training(self) -> float:
        """Seconds a time budget keeps back for saving and evaluation when it is turned into steps."""
        cfg, data, gen_s_per_item = self.cfg, self.data, self.gen_s_per_item
        if cfg.budget.max_seconds is None:
            return 0.0
        total = cfg.budget.max_seconds
        saving = min(10.0, 0.05 * total)
        if not _will_evaluate(cfg, data):
            return saving
        if gen_s_per_item is None:
            return saving + 0.2 * total
        n = _eval_case_count(cfg, data) + 2 * cfg.hyperparameters.eval_probes  # probes: base and tuned answers
        return min(saving + n * gen_s_per_item, 0.5 * total)


def run_importance(cfg: FinetuneConfig, on_event: EventFn | None = None, should_cancel: CancelFn | None = None):
    """Only score and select components (steps 1, 3 and 4 of :func:`finetune`); write importance.json/png.

    Returns the :class:`~citi_engine.importance.ImportanceResult`. Replay data is built as in a
    job when the training file has no general examples.
    """
    ctx = RunContext(on_event, should_cancel, RunClock())
    data, tool, general = _prepare_data(cfg, ctx)
    ctx.phase("loading")
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, model_dirs=cfg.model_dirs)
    general_set = "general" if general else "replay"
    if not general:
        replay, _ = _build_replay(ctx, cfg, model, tokenizer, data.tool)
        general = _encode(tokenizer, replay, None, cfg.hyperparameters.max_length, "replay")
    result = _score_components(ctx, cfg, model, tokenizer, _calls_only(tool), general, general_set)
    result.save(cfg.out_dir)
    ctx.emit("done", "importance", message=f"importance written to {Path(cfg.out_dir) / 'importance.json'}")
    return result


# --------------------------------------------------------------------------------------- one step


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Multiplier of the peak learning rate at 0-based ``step`` of a ``total``-step stage.

    Linear warm-up over ``ceil(warmup_ratio * total)`` steps that starts at 1/warmup (never 0, so
    even a one-step stage moves its weights), then a cosine decay that stays above 0 on the last step.
    """
    total = max(total, 1)
    warmup = max(1, math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

def step_loss_module(
    model,
    cfg: FinetuneConfig,
    *,
    routing_loss: Callable | None,
    device: torch.device,
    frozen_dtype: torch.dtype,
    dist: DistInfo | None = None,
    teacher=None,
) -> torch.nn.Module:
    """The loss of one micro-batch as a module (in DDP when several processes train), for :func:`accumulate_gradients`.

    ``routing_loss`` (citi) adds the routing terms: the paper's balancing loss at ``routing_beta`` and the
    token-level objective at ``routing_token_weight``. ``teacher`` (a :class:`~citi_engine.losses.Teacher`)
    turns the loss on general answers into KL to the frozen base (``general_loss: kl``).
    Build it after ``set_trainable``: DDP reduces the gradients of what requires grad when it is built.
    """
    hp = cfg.hyperparameters
    dist = dist or DistInfo()
    beta = token_weight = 0.0
    if routing_loss is not None:
        beta = hp.routing_beta / (_count_molora_layers(model) if hp.routing_beta_per_layer else 1)
        token_weight = hp.routing_token_weight
    loss_fn = functools.partial(_micro_loss, device=device, autocast=_autocast(device, frozen_dtype),
                                beta=beta, token_weight=token_weight, delta=hp.routing_delta,
                                balance=hp.routing_balance, world_size=dist.world_size, teacher=teacher)
    # Every process already holds the same weights (broadcast once after the method is applied).
    return wrap_ddp(LossModule(model, loss_fn), dist, init_sync=False)


def _micro_loss(
    model, batch: dict, *, n_answer: int, n_examples: int, n_route: tuple[int, int] | None = None, device, autocast,
    beta: float, token_weight: float, delta: float, world_size: int, teacher=None, balance: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss to backpropagate, answer part, weighted routing part)`` of one micro-batch of a step.

    The answer loss (cross-entropy, and KL to the teacher on general answers when there is a teacher) is
    summed over the micro-batch's answer tokens and divided by the step's ``n_answer``, so every answer token
    of the step weighs the same wherever it lands. The balancing loss of the micro-batch (one value per
    example row from its task type and its tokens' router weights) is weighted by the micro-batch's share of
    the step's ``n_examples``; the token-level objective is summed over its tokens and divided by the step's
    ``n_route`` counts, like the answer loss. DDP
    averages the gradients over the processes, so the loss is multiplied by their number to get the sum.
    """
    batch = to_device(batch, device)
    with autocast:
        # The output head runs on answer positions only: most tokens (prompts, tool schemas) carry no label.
        ce_sum, kl_sum, positions, kinds = answer_losses(model, batch, teacher=teacher)
    answer = (ce_sum + kl_sum) / max(n_answer, 1)
    loss = answer
    routing = torch.zeros((), device=answer.device)
    share = int(batch["task_type"].numel()) / n_examples
    if beta > 0:
        mask = batch["sequence_mask"] if "sequence_mask" in batch else batch["attention_mask"]
        routing = routing + beta * routing_loss(model, batch["task_type"], mask, delta, balance) * share
    if token_weight > 0:
        target = backbone_targets(batch["token_kind"], positions, kinds)
        routing = routing + token_weight * token_routing_loss(model, target, n_route)
    loss = loss + routing
    return loss * world_size, answer.detach(), routing.detach()


def accumulate_gradients(step_module, micro: list[dict], *, n_answer: int, n_examples: int,
                         n_route: tuple[int, int] | None = None) -> tuple[float, float]:
    """Forward and backward over this process's ``micro``-batches of one step; return its part of the
    step's ``(answer loss, weighted routing terms)`` (the whole step's in one process).

    ``step_module`` comes from :func:`step_loss_module`; ``n_answer`` and ``n_examples`` count the
    whole step (:func:`~citi_engine.training.batches.answer_tokens`), and so does ``n_route``
    (:func:`~citi_engine.training.batches.routing_token_counts`, for the token-level routing objective). Under DDP only the last
    backward reduces the gradients (the others run in ``no_sync``), so processes may hold different
    numbers of micro-batches.
    """
    ce_total = rl_total = None
    last = len(micro) - 1
    for i, b in enumerate(micro):
        sync = step_module.no_sync() if i < last and hasattr(step_module, "no_sync") else contextlib.nullcontext()
        with sync:
            loss, ce, rl = step_module(b, n_answer=n_answer, n_examples=n_examples, n_route=n_route)
            if loss.requires_grad:  # False only when nothing trains at all
                loss.backward()
        ce_total = ce if ce_total is None else ce_total + ce
        rl_total = rl if rl_total is None else rl_total + rl
    if ce_total is None:
        return 0.0, 0.0
    return float(ce_total), float(rl_total)  # one host sync per step


def _optimizer_step(
    step_module, micro: list[dict], optimizer, scheduler, params, *, n_answer: int, n_examples: int,
    n_route: tuple[int, int], max_grad_norm: float, dist: DistInfo,
) -> tuple[float, float]:
    """One optimizer step (gradient accumulation over ``micro``); returns the step's (answer loss, routing terms)."""
    ce, rl = accumulate_gradients(step_module, micro, n_answer=n_answer, n_examples=n_examples, n_route=n_route)
    ce, rl = sum_over_ranks([ce, rl], dist)  # every process sees the same sums, so all stop together
    if not math.isfinite(ce) or not math.isfinite(rl):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"the training loss became {ce if not math.isfinite(ce) else rl} (not a finite "
                               "number), so the weights would be poisoned: lower the learning rate and run again")
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return ce, rl


def _share_spent(plan: StagePlan, si: int, tokens_after_step: int, elapsed_s: float) -> bool:
    """True when the next step would pass the stage's token share, or the stage's time is up."""
    limit = plan.token_limits[si]
    if limit is not None and tokens_after_step > limit:
        return True
    deadline = plan.time_limits[si] if plan.time_limits else None
    return deadline is not None and elapsed_s >= deadline


def _seconds_per_step(timed: list[float]) -> float:
    # The first step of a run pays for lazy initialisation; leave it out once others exist.
    usable = timed[1:] if len(timed) > 1 else timed
    return sum(usable) / max(len(usable), 1)


def _autocast(device: torch.device, frozen_dtype: torch.dtype):
    if device.type == "cuda" and frozen_dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _pack_tokens(cfg: FinetuneConfig) -> int:
    hp = cfg.hyperparameters
    return hp.pack_tokens or hp.batch_size * hp.max_length


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _agreed_weights(trainable: dict[str, Any], dist: DistInfo) -> str:
    """SHA-256 of the trained tensors, after checking every process ended with the very same ones."""
    digest = tensors_sha256(trainable["params"])
    digests = gather_objects(digest, dist)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the {dist.world_size} data-parallel processes ended with different weights "
                           f"(SHA-256 by rank: {', '.join(d[:12] for d in digests)}): a bug, please report it")
    return digest


def _adapter_stage(method: str, stage: str) -> str:
    """The set_trainable stage name for a recipe stage (baselines: their method's name)."""
    return method if stage == "train" else stage


def _count_molora_layers(model) -> int:
    return max(1, len(molora_layers(model)))


# ---------------------------------------------------------------------------------------- plumbing


class RunContext:
    """Events, cancellation and the run's clock, shared by every phase of a run.

    A *phase* is where the run is (``validating``, ``loading``, ``replay``, ``importance``, a training
    stage, ``saving``, ``eval``); events carry it in their ``stage`` field, the name the service reads.
    """

    def __init__(self, on_event: EventFn | None = None, should_cancel: CancelFn | None = None,
                 clock: RunClock | None = None, dist: DistInfo | None = None):
        self.on_event = on_event
        self.should_cancel = should_cancel
        self.clock = clock or RunClock()
        self.dist = dist or DistInfo()

    def emit(self, type_: str, phase: str, **fields: Any) -> None:
        """Send one event (rank 0 only); ``phase`` goes into the event's ``stage`` field."""
        if self.on_event is None or self.dist.rank != 0:  # one process speaks for a data-parallel run
            return
        event = {"type": type_, "stage": phase, "step": 0, "total_steps": 0, "loss": None, "routing_loss": None,
                 "lr": None, "tokens_per_s": None, "eta_s": None, "message": ""}
        event.update(fields)
        self.on_event(event)

    def phase(self, phase: str) -> None:
        """Announce that ``phase`` starts (an event of type ``stage``)."""
        self.emit("stage", phase, message=f"{phase} started")

    def message(self, phase: str, text: str) -> None:
        """Send a line of text during ``phase``."""
        self.emit("message", phase, message=text)

    def cancel_requested(self) -> bool:
        """This process's own answer (see :meth:`check_cancel` for the one all processes share)."""
        return self.should_cancel is not None and bool(self.should_cancel())

    def check_cancel(self, where: str) -> None:
        """Raise :class:`Cancelled` when a cancel was asked for (with several processes: on all of them
        when any one was asked; every process must call it at the same point)."""
        (cancel,) = any_rank([self.cancel_requested()], self.dist)
        if cancel:
            raise Cancelled(f"the job was cancelled during {where}")


@dataclass
class TrainState:
    """Where training is: stage, step within it, steps and tokens so far (what a checkpoint records)."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    tokens: int = 0
    timed_steps: int = 0
    loss: float | None = None  # of the last step: a checkpoint records the losses of the step it holds
    routing_loss: float | None = None


@dataclass
class _Data:
    tool: list[dict]
    tool_lines: list[int]
    general: list[dict]
    general_lines: list[int] | None
    general_param: str
    test: list[dict]  # held out of the training file; empty when validation_file is given


def _prepare_data(cfg: FinetuneConfig, ctx: RunContext) -> tuple[_Data, list[dict], list[dict]]:
    """Validate every file and tokenise the training examples (the tokenizer only, no model yet)."""
    ctx.phase("validating")
    hp = cfg.hyperparameters
    data = _load_data(cfg)
    ctx.check_cancel("validation")
    tokenizer = _load_tokenizer(cfg)
    tool = _encode(tokenizer, mask_some(data.tool, hp.function_masking, seed=cfg.seed), data.tool_lines,
                   hp.max_length, "training_file")
    general = _encode(tokenizer, data.general, data.general_lines, hp.max_length, data.general_param)
    # Built from the job's own tool examples; one cut to max_length would lose its answer, so it is left out.
    built = build_negatives(data.tool, hp.negatives_ratio, seed=cfg.seed, near=hp.negatives_near)
    negatives = [e for e in _encode(tokenizer, built, None, hp.max_length, "negatives") if not e.pop("truncated")]
    if not tool:
        raise DataValidationError(
            "the training file holds no tool examples (examples with 'tools' or tool calls) to train on once the "
            "test split is held out; add tool examples, or pass a validation_file and test_fraction=0",
            [Problem(0, "too_few_examples", "no tool examples left for training")],
        )
    ctx.message("validating", f"{len(tool)} tool and {len(general)} general training examples, "
                              f"{len(negatives)} irrelevance negatives built from the tool examples, "
                              f"{len(data.test)} tool examples held out for testing")
    return data, tool + negatives, general


def _load_data(cfg: FinetuneConfig) -> _Data:
    """Validate the training, general and validation files; hold out the test split."""
    report = validate_jsonl(_existing(cfg.training_file, "training_file"))
    report.raise_if_invalid("training_file")
    tool_idx = [i for i, e in enumerate(report.examples) if task_type_of(e) == TaskType.TOOL]
    general_idx = [i for i, e in enumerate(report.examples) if task_type_of(e) == TaskType.GENERAL]
    test_idx: list[int] = []
    if cfg.validation_file:
        try:
            load_tool_cases(_existing(cfg.validation_file, "validation_file"))
        except DataValidationError as exc:
            exc.param = "validation_file"
            raise
    else:
        tool_idx, test_idx = split_test(tool_idx, cfg.test_fraction, seed=cfg.seed)
    general = [report.examples[i] for i in general_idx]
    general_lines = [report.lines[i] for i in general_idx]
    general_param = "training_file"
    if cfg.general_file:
        greport = validate_jsonl(_existing(cfg.general_file, "general_file"), min_examples=1)
        greport.raise_if_invalid("general_file")
        if not general:  # one file's line numbers per list, so length problems point at the right file
            general, general_lines, general_param = list(greport.examples), list(greport.lines), "general_file"
        else:
            general = general + list(greport.examples)
            general_lines = None
    return _Data(
        tool=[report.examples[i] for i in tool_idx],
        tool_lines=[report.lines[i] for i in tool_idx],
        general=general,
        general_lines=general_lines,
        general_param=general_param,
        test=[report.examples[i] for i in test_idx],
    )


def _existing(path: str, param: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataValidationError(f"{param} '{path}' does not exist or is not a file: check the path",
                                  [Problem(0, "invalid_field", f"no file at '{path}'")], param=param)
    return p


def _load_tokenizer(cfg: FinetuneConfig):
    return load_tokenizer(resolve_model_spec(cfg.model, model_dirs=cfg.model_dirs))


def _encode(tokenizer, examples: list[dict], lines: list[int] | None, max_length: int, param: str) -> list[dict]:
    """Token ids and labels of every example; every example longer than ``max_length`` is a problem."""
    encoded = [encode_example(tokenizer, e, max_length) for e in examples]
    too_long = [i for i, e in enumerate(encoded) if e["truncated"]]
    if param in BUILT_SETS:  # data the engine made itself: nothing for the user to fix
        return [{"input_ids": e["input_ids"], "labels": e["labels"], "kind": int(kind_of(x)),
                 "task_type": int(task_type_for_kind(kind_of(x))), "truncated": e["truncated"]}
                for e, x in zip(encoded, examples, strict=True)]
    if too_long:
        problems = check_lengths([examples[i] for i in too_long], tokenizer, max_length,
                                 lines=[lines[i] if lines else 0 for i in too_long])
        raise DataValidationError(f"{param} has {len(problems)} example(s) longer than max_length={max_length}: "
                                  f"{problems[0]}", problems, param=param)
    return [{"input_ids": e["input_ids"], "labels": e["labels"], "kind": int(kind_of(x)),
             "task_type": int(task_type_for_kind(kind_of(x)))} for e, x in zip(encoded, examples, strict=True)]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# Rows a GPU generates at once unless the job says otherwise: decoding is bound by kernel launches at these
# model sizes, so 64 rows take about the time of 16 (the GPU host run: replay and evaluation were 240 of a
# 310 s job at 16).
GPU_GENERATION_BATCH = 64


def generation_batch_size(hp, model) -> int:
    """Rows generated at once for replay and evaluation: the setting, else 64 on a GPU and batch_size on CPU."""
    if hp.generation_batch_size:
        return hp.generation_batch_size
    return GPU_GENERATION_BATCH if model_device(model).type == "cuda" else hp.batch_size


def _build_replay(ctx: RunContext, cfg: FinetuneConfig, model, tokenizer, tool_examples: list[dict]
                  ) -> tuple[list[dict], float]:
    """General examples answered by the base model (``replay_tools_fraction`` of them with an unrelated tool
    list from ``tool_examples`` offered); also returns seconds per answer (for the time budget)."""
    hp = cfg.hyperparameters
    ctx.phase("replay")
    t0 = time.monotonic()
    n_tools = round(hp.replay_tools_fraction * hp.replay_examples)
    examples = build_replay(
        model, tokenizer, count=hp.replay_examples, seed=cfg.seed, max_new_tokens=hp.replay_max_new_tokens,
        batch_size=generation_batch_size(hp, model), should_cancel=ctx.should_cancel,
        tool_lists=unrelated_tool_lists(tool_examples, n_tools, seed=cfg.seed), decode=hp.generation_decode,
        on_progress=lambda done, total: ctx.emit("progress", "replay", step=done, total_steps=total),
    )
    per_item = (time.monotonic() - t0) / max(hp.replay_examples, 1)
    with_tools = sum(1 for e in examples if e.get("tools"))
    ctx.message("replay", f"the base model answered {len(examples)} general prompts for replay "
                          f"({with_tools} of them with unrelated tools offered)")
    return examples, per_item


def _score_components(
    ctx: RunContext, cfg: FinetuneConfig, model, tokenizer, tool: list[dict], general: list[dict], general_name: str,
    *, packing: bool = False,
):
    """Importance on a sample of each set, then the MOLoRA / UCO selection (method page, sections 1-2)."""
    hp = cfg.hyperparameters
    ctx.phase("importance")
    pad_id = _pad_id(tokenizer)
    batch_size = hp.importance_batch_size or hp.batch_size
    pack_tokens = (hp.pack_tokens or batch_size * hp.max_length) if packing else None
    batches = {}
    for salt, (name, encoded) in enumerate((("tool", tool), (general_name, general))):
        chosen = [encoded[i] for i in sample_indices(len(encoded), hp.importance_examples, seed=cfg.seed,
                                                     salt=101 + salt)]
        chosen.sort(key=lambda e: len(e["input_ids"]))  # similar lengths together: less padding
        batches[name] = step_batches(chosen, micro_size=batch_size, pad_id=pad_id, pack_tokens=pack_tokens)
    scores = compute_importance(
        model, batches, should_cancel=ctx.should_cancel,
        on_progress=lambda done, total: ctx.emit("progress", "importance", step=done, total_steps=total or 0),
    )
    result = ImportanceResult.from_scores(scores, molora_fraction=cfg.components.molora_fraction,
                                          uco_fraction=cfg.components.uco_fraction,
                                          selection=cfg.components.selection, seed=cfg.seed)
    ctx.emit("importance", "importance", message=f"{len(result.molora)} MOLoRA and {len(result.uco)} UCO components "
             f"chosen out of {len(result.components)}")
    return result


def _calls_only(examples: list[dict]) -> list[dict]:
    """The examples that call tools (tool importance is scored on these, not on irrelevance negatives)."""
    calls = [e for e in examples if e.get("kind", ExampleKind.TOOL) == ExampleKind.TOOL]
    return calls or examples


def _frozen_copy(model):
    """An untouched copy of the base model, frozen, in its loaded dtype: the teacher of a full fine-tune."""
    frozen = copy.deepcopy(model)
    frozen.requires_grad_(False)
    return frozen.eval()


def _fp32_trainables(model, cfg: FinetuneConfig) -> dict[str, Any]:
    """Names of what each stage trains, and those tensors turned fp32 (master copies for mixed precision)."""
    by_stage = {s: set_trainable(model, _adapter_stage(cfg.method, s)) for s in cfg.stages}
    params = dict(model.named_parameters())
    union = [n for n in params if any(n in names for names in by_stage.values())]
    for n in union:
        if params[n].dtype != torch.float32:
            params[n].data = params[n].data.float()
    return {"by_stage": by_stage, "names": union, "params": {n: params[n] for n in union}}


def _restore_prepared(ckpt: Checkpoint, cfg: FinetuneConfig) -> tuple[list[dict], float | None, Any]:
    """Replay data, generation speed and importance result as the interrupted run had them."""
    importance = None
    if cfg.method == "citi":
        importance = ImportanceResult.from_json(ckpt.read_json("importance.json"))
    return ckpt.read_jsonl("replay.jsonl") or [], ckpt.meta.get("gen_s_per_item"), importance


def _load_tensors(model, trainable: dict[str, Any], ckpt: Checkpoint) -> None:
    saved = ckpt.tensors()
    missing = [n for n in trainable["names"] if n not in saved]
    if missing:
        raise RuntimeError(f"checkpoint {ckpt.path} lacks {len(missing)} trained tensors (e.g. {missing[0]}); "
                           "delete the checkpoints directory to start over")
    with torch.no_grad():
        for n in trainable["names"]:
            trainable["params"][n].copy_(saved[n])


def _check_same_job(ckpt: Checkpoint, cfg: FinetuneConfig) -> None:
    """A checkpoint only resumes the job that wrote it."""
    ignore = {"out_dir", "device"}
    then, now = _flatten(ckpt.meta.get("config", {})), _flatten(cfg.to_dict())
    differ = sorted(k for k in set(then) | set(now) if k.split(".")[0] not in ignore and then.get(k) != now.get(k))
    if differ:
        raise ValueError(
            f"{ckpt.path.parent} holds checkpoints of a different job (differs in: {', '.join(differ[:6])}); "
            f"use another out_dir, or delete {ckpt.path.parent} to start over"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------- after training


def _write_model_card(out_dir: Path, cfg: FinetuneConfig, components: dict, stage_steps: dict, tokens: int) -> None:
    """README.md: what this adapter is and how to load it."""
    steps = ", ".join(f"{name} {n}" for name, n in stage_steps.items())
    if cfg.method == "citi":
        what = (f"CITI adapter: MOLoRA ({cfg.components.num_experts} experts of rank {cfg.components.rank}, "
                f"alpha {cfg.components.alpha:g}) on {len(components['molora'])} components, "
                f"{len(components['uco'])} UCO components fully fine-tuned. "
                "`importance.json` / `importance.png` show why these components were chosen.")
        load = (
            "```python\n"
            "import citi_engine.molora  # registers the MOLoRA peft method\n"
            "from peft import PeftModel\n"
            "from citi_engine.models import load_model\n\n"
            f"base, tokenizer = load_model({cfg.model!r})\n"
            f"model = PeftModel.from_pretrained(base, {str(out_dir)!r})\n"
            "```\n"
        )
    elif cfg.method == "lora":
        what = f"LoRA baseline (rank {cfg.components.lora_rank}, alpha {cfg.components.lora_alpha:g}) on every " \
               "linear layer of the decoder."
        load = (
            "```python\n"
            "from peft import PeftModel\n"
            "from citi_engine.models import load_model\n\n"
            f"base, tokenizer = load_model({cfg.model!r})\n"
            f"model = PeftModel.from_pretrained(base, {str(out_dir)!r})\n"
            "```\n"
        )
    else:
        what = "Full fine-tuning baseline: every weight trained; this directory is a whole Hugging Face model."
        load = ("```python\n"
                "from transformers import AutoModelForCausalLM\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({str(out_dir)!r})\n"
                "```\n")
    card = (
        f"# {out_dir.name}\n\n"
        f"Fine-tuned from `{cfg.model}` for tool calling by the citi engine (method `{cfg.method}`).\n\n"
        f"{what}\n\n"
        f"Training: {steps} steps, {tokens:,} tokens, seed {cfg.seed}; the full configuration is in "
        "`citi_job.json`.\n\n"
        "## Use\n\n"
        f"From the command line:\n\n```\nciti chat --adapter {out_dir} \"What is the weather in Paris?\" "
        "--tools tools.json\n```\n\n"
        f"From Python:\n\n{load}\n"
        "or `citi_engine.adapter.load_adapter(dir)`, which reads the base model from `citi_job.json`.\n"
    )
    if (out_dir / "report.md").is_file() or cfg.hyperparameters.eval_examples:
        card += "\nEvaluation (when run): `report.md` and `report.json` in this directory.\n"
    (out_dir / "README.md").write_text(card)


def _will_evaluate(cfg: FinetuneConfig, data: _Data) -> bool:
    return cfg.hyperparameters.eval_examples > 0 and bool(cfg.validation_file or data.test)


def _eval_case_count(cfg: FinetuneConfig, data: _Data) -> int:
    n = cfg.hyperparameters.eval_examples
    return n if cfg.validation_file else min(n, len(data.test))
