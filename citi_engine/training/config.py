"""The configuration of a fine-tuning job: one plain dataclass, every field with its own help text.

Torch-free, so the API can check a job's parameters at submit time with the same rules the engine
applies. :class:`FinetuneConfig` refuses impossible combinations in ``__post_init__`` with a
ValueError that says why and how to fix it.

Defaults. The paper's values (alpha=2, beta=0.01, epochs 1/2/1, lr 2e-4/2e-4/2e-5) learn almost
nothing at the data sizes our users bring (hundreds to a few thousand examples). The defaults below
are the winners of the quality benchmark's validation sweep (bench/results/quality_sweep.md: SmolLM2,
810 BFCL training examples, 120 validation cases whose functions are unseen, chosen by tool accuracy):
CITI stage-2 lr 1e-3, alpha 32, MOLoRA on 30% of the components; LoRA lr 1e-3; full fine-tuning lr 1e-4.
Each field's help gives the paper's value beside ours. Not swept (kept from the prototype): beta 5e-4,
3 stage-2 epochs, stage-1/3 learning rates, ranks and expert count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from citi_engine import DEFAULT_MODEL
from citi_engine.budget import Budget

METHODS = ("citi", "lora", "full")
GENERAL_LOSSES = ("kl", "ce")
DTYPES = ("auto", "bf16", "bfloat16", "fp32", "float32")

# Stage names as the events and the checkpoints spell them.
CITI_STAGES = ("router_pretraining", "molora", "uco")
BASELINE_STAGES = ("train",)


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ComponentsConfig:
    """Which components get adapted and how big the adapters are (the parameter budget)."""

    molora_fraction: float = field(
        default=0.30,
        metadata=_help("Fraction of components (top by tool importance) that get MOLoRA. Paper: 0.20; 0.30 led our "
                       "sweep (0.10 / 0.20 / 0.30: validation tool accuracy 0.33 / 0.44 / 0.47)."),
    )
    uco_fraction: float = field(
        default=0.10,
        metadata=_help("Fraction of components (bottom by general importance) fully fine-tuned in stage 3. Paper: 0.10. "
                       "0 runs no stage 3 (an ablation: CITI without UCO)."),
    )
    num_experts: int = field(default=4, metadata=_help("LoRA experts per MOLoRA component. Paper: 4."))
    rank: int = field(default=8, metadata=_help("Rank of each MOLoRA expert. Paper: 8."))
    alpha: float = field(
        default=32.0,
        metadata=_help("MOLoRA scaling numerator: experts are scaled by alpha/rank. Paper: 2 (scale 0.25), which "
                       "learned almost nothing at small data sizes; 32 (scale 4) led our sweep over 16 and 32."),
    )
    lora_rank: int = field(default=16, metadata=_help("Rank of the LoRA baseline (method=lora). Paper: 16."))
    lora_alpha: float = field(default=16.0, metadata=_help("Alpha of the LoRA baseline (method=lora). Paper: 16."))
    selection: str = field(
        default="importance",
        metadata=_help("How the MOLoRA and UCO components are chosen: importance (the method) or random (an "
                       "ablation: sets of the same sizes drawn with the job's seed, scores ignored)."),
    )

    def __post_init__(self) -> None:
        v = self.molora_fraction
        if not _is_number(v) or not 0.0 < v < 1.0:
            raise ValueError(f"components.molora_fraction must be a fraction strictly between 0 and 1, got {v!r}")
        v = self.uco_fraction
        if not _is_number(v) or not 0.0 <= v < 1.0:
            raise ValueError(f"components.uco_fraction must be a fraction from 0 (no stage 3) to below 1, got {v!r}")
        if self.selection not in ("importance", "random"):
            raise ValueError(f"components.selection must be 'importance' or 'random', got {self.selection!r}")
        if self.molora_fraction + self.uco_fraction > 1.0:
            raise ValueError(
                f"components.molora_fraction + uco_fraction = {self.molora_fraction + self.uco_fraction:g} > 1: "
                "a component is never both MOLoRA and UCO, so together they can cover at most all components"
            )
        for name in ("num_experts", "rank", "lora_rank"):
            _positive_int(self, name, "components")
        for name in ("alpha", "lora_alpha"):
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                raise ValueError(f"components.{name} must be a positive number, got {v!r}")


@dataclass
class Hyperparameters:
    """Optimisation settings. Learning rates and epochs are per stage."""

    batch_size: int = field(default=16, metadata=_help("Examples per optimizer step (before accumulation). Paper: 4x4."))
    gradient_accumulation_steps: int = field(
        default=1, metadata=_help("Micro-batches summed into one optimizer step; the step sees batch_size x this.")
    )
    lr_router_pretraining: float = field(
        default=2e-4, metadata=_help("Peak learning rate of stage 1, router pre-training (citi). Paper: 2e-4.")
    )
    lr_molora: float = field(
        default=1e-3,
        metadata=_help("Peak learning rate of stage 2, MOLoRA improvement (citi). Paper: 2e-4; 1e-3 led our sweep "
                       "over 5e-4, 1e-3 and 2e-3 (2e-3 tied on tool accuracy with lower retention)."),
    )
    lr_uco: float = field(
        default=2e-5, metadata=_help("Peak learning rate of stage 3, UCO full-weight training (citi). Paper: 2e-5.")
    )
    lr_train: float | None = field(
        default=None,
        metadata=_help("Peak learning rate of the single stage of the lora/full baselines. Default by method: "
                       "lora 1e-3, full 1e-4, the winners of our sweep (the paper's baselines: 2e-4 and 2e-5, which "
                       "underfit at our data sizes)."),
    )
    epochs_router_pretraining: float = field(
        default=1.0, metadata=_help("Epochs of stage 1 over the mixed data (citi). Paper: 1.")
    )
    epochs_molora: float = field(default=3.0, metadata=_help("Epochs of stage 2 over the mixed data (citi). Paper: 2."))
    epochs_uco: float = field(default=1.0, metadata=_help("Epochs of stage 3 over the mixed data (citi). Paper: 1."))
    epochs_train: float = field(default=2.0, metadata=_help("Epochs of the lora/full baselines. Paper: 2."))
    warmup_ratio: float = field(
        default=0.1,
        metadata=_help("Fraction of each stage's steps spent warming up (cosine schedule after). The first step "
                       "already uses a nonzero learning rate. Paper: 0.1."),
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip gradients to this norm; 0 turns clipping off."))
    routing_beta: float = field(
        default=5e-4,
        metadata=_help("Weight of the routing loss added to the cross-entropy (summed over MOLoRA layers). "
                       "Paper: 0.01, which dominated the cross-entropy at small data sizes."),
    )
    routing_beta_per_layer: bool = field(
        default=False,
        metadata=_help("Treat routing_beta as a total spread over the layers: divide it by the number of MOLoRA "
                       "layers, so the routing term's weight does not grow with model depth."),
    )
    routing_delta: float = field(
        default=0.95, metadata=_help("delta of the localized balancing constraint (0 < delta < 1). Paper: 0.95.")
    )
    routing_token_weight: float = field(
        default=0.1,
        metadata=_help("Weight of the token-level routing objective (not in the paper): on every MOLoRA layer, the "
                       "backbone gate G(x)[0] is trained towards 1 on the tokens of general examples and towards 0 "
                       "on the tokens that write a tool call (binary cross-entropy, the two kinds averaged "
                       "apart, then over layers). 0 turns it off; routing_beta is the paper's batch-level loss, "
                       "which can be used beside it."),
    )
    general_loss: str = field(
        default="kl",
        metadata=_help("Loss on the answers of general examples: kl (soft targets, not in the paper: the KL from "
                       "the frozen base model's next-token distribution, computed in the same step with the "
                       "adapters switched off, or from a frozen copy for full fine-tuning) or ce (cross-entropy on "
                       "the answer text, the paper's way)."),
    )
    negatives_ratio: float = field(
        default=0.25,
        metadata=_help("Irrelevance negatives built from the job's own tool examples, per tool example: a request "
                       "paired with a tool list that lacks the function it needs (the called functions dropped, or "
                       "tools taken from another example), answered in plain text that no tool fits. 0 turns "
                       "them off."),
    )
    function_masking: float = field(
        default=0.0,
        metadata=_help("Fraction of tool examples whose function and parameter names are replaced by neutral ones "
                       "(func_1, param_1, ...) in the tools and the calls, so the model learns to read the "
                       "descriptions rather than the names (as in the Hammer paper). 0 turns it off."),
    )
    replay_tools_fraction: float = field(
        default=0.5,
        metadata=_help("Share of the replay prompts (general data the base model answers itself) asked with an "
                       "unrelated tool list from the job's own data in the system turn, so the tuned model keeps "
                       "answering general questions as before when tools are offered. 0: no tools in replay."),
    )
    max_length: int = field(
        default=2048, metadata=_help("Longest example in tokens; longer examples are refused by the validator.")
    )
    importance_examples: int = field(
        default=512, metadata=_help("Examples sampled per set (tool, general) to score component importance. "
                                    "Paper: up to 3000.")
    )
    importance_batch_size: int | None = field(
        default=None, metadata=_help("Batch size while scoring importance; default: batch_size.")
    )
    replay_examples: int = field(
        default=128,
        metadata=_help("General examples built by letting the base model answer built-in prompts, when the "
                       "job brings no general data (citi needs both task types)."),
    )
    replay_max_new_tokens: int = field(
        default=256, metadata=_help("Longest replay answer the base model may write, in tokens.")
    )
    eval_examples: int = field(
        default=200, metadata=_help("Most tool test examples evaluated at the end (0: no evaluation).")
    )
    eval_probes: int = field(
        default=64, metadata=_help("Most general probe prompts used to measure retention at the end.")
    )
    eval_max_new_tokens: int = field(
        default=256, metadata=_help("Longest reply generated per test case during evaluation, in tokens.")
    )
    eval_humaneval: int = field(
        default=32, metadata=_help("HumanEval problems whose canonical solutions' NLL measures code retention at "
                                   "the end (0: skip).")
    )
    baselines_use_general: bool = field(
        default=False,
        metadata=_help("Let the lora/full baselines train on the general examples too. Off by default: the "
                       "paper's baselines train on tool data only."),
    )
    packing: bool | None = field(
        default=None,
        metadata=_help("Pack several examples into each micro-batch row (positions restart and attention stays "
                       "inside each example), so no compute goes to padding; the loss and the gradients are those "
                       "of padded batches. Default: on when training in bf16 on a GPU whose variable-length attention "
                       "kernel passes its self-check at start, off otherwise (on CPU). true packs anyway (SDPA "
                       "with a block-diagonal mask where that kernel is missing); false pads."),
    )
    pack_tokens: int | None = field(
        default=None,
        metadata=_help("Most tokens in one packed row (when packing). Default: batch_size x max_length, the most "
                       "a padded micro-batch can hold, so packing never needs more memory than padding. Also the "
                       "row size while scoring importance (default there: importance_batch_size x max_length)."),
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "importance_examples",
                     "replay_examples", "replay_max_new_tokens", "eval_max_new_tokens"):
            _positive_int(self, name, "hyperparameters")
        if self.importance_batch_size is not None:
            _positive_int(self, "importance_batch_size", "hyperparameters")
        for name in ("eval_examples", "eval_probes", "eval_humaneval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"hyperparameters.{name} must be a whole number >= 0, got {v!r}")
        for name in ("lr_router_pretraining", "lr_molora", "lr_uco", "epochs_router_pretraining",
                     "epochs_molora", "epochs_uco", "epochs_train"):
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                raise ValueError(f"hyperparameters.{name} must be a positive number, got {v!r}")
        if self.lr_train is not None and (not _is_number(self.lr_train) or self.lr_train <= 0):
            raise ValueError(f"hyperparameters.lr_train must be a positive number, got {self.lr_train!r}")
        if not _is_number(self.warmup_ratio) or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"hyperparameters.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        for name in ("weight_decay", "max_grad_norm", "routing_beta"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise ValueError(f"hyperparameters.{name} must be a number >= 0, got {v!r}")
        if not _is_number(self.routing_token_weight) or self.routing_token_weight < 0:
            raise ValueError(f"hyperparameters.routing_token_weight must be a number >= 0, got "
                             f"{self.routing_token_weight!r}")
        if self.general_loss not in GENERAL_LOSSES:
            raise ValueError(f"hyperparameters.general_loss must be one of {', '.join(GENERAL_LOSSES)}, got "
                             f"{self.general_loss!r}")
        for name, top in (("negatives_ratio", 4.0), ("function_masking", 1.0), ("replay_tools_fraction", 1.0)):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 <= v <= top:
                raise ValueError(f"hyperparameters.{name} must be a number from 0 to {top:g}, got {v!r}")
        if not _is_number(self.routing_delta) or not 0.0 < self.routing_delta < 1.0:
            raise ValueError(f"hyperparameters.routing_delta must be strictly between 0 and 1, got "
                             f"{self.routing_delta!r}")
        if self.max_length < 16:
            raise ValueError(f"hyperparameters.max_length={self.max_length} is too short for any chat example; "
                             "use 256 or more")
        if self.packing is not None and not isinstance(self.packing, bool):
            raise ValueError(f"hyperparameters.packing must be true, false or null (automatic), got {self.packing!r}")
        if self.pack_tokens is not None:
            _positive_int(self, "pack_tokens", "hyperparameters")
            if self.pack_tokens < self.max_length:
                raise ValueError(f"hyperparameters.pack_tokens={self.pack_tokens} is less than max_length="
                                 f"{self.max_length}: a packed row must hold the longest example; raise pack_tokens "
                                 "or lower max_length")


@dataclass(kw_only=True)
class FinetuneConfig:
    """Everything a fine-tuning job needs. Build it from keywords or :meth:`from_dict`; it checks itself."""

    model: str = field(default=DEFAULT_MODEL, metadata=_help(
        "Base model: 'smollm2-135m-instruct', a local Hugging Face directory or .gguf file, or a hub id."))
    training_file: str = field(metadata=_help(
        "Training data, OpenAI chat fine-tuning JSONL (tool examples, and optionally general ones)."))
    out_dir: str = field(metadata=_help("Where the adapter, its report and the checkpoints are written."))
    validation_file: str | None = field(default=None, metadata=_help(
        "Held-out tool test set (JSONL). Without one, test_fraction of the tool examples is held out."))
    general_file: str | None = field(default=None, metadata=_help(
        "General (non-tool) examples to mix in (JSONL). Without any general data, citi builds replay data."))
    method: str = field(default="citi", metadata=_help(
        "citi (importance-guided MOLoRA + UCO, 3 stages), lora (peft LoRA on all linear layers) or full."))
    seed: int = field(default=0, metadata=_help("Seed for data order, sampling, splits and initialisation."))
    preset: str | None = field(default=None, metadata=_help(
        "A named set of settings laid under the ones given: 'paper' runs the method as the CITI paper states it "
        "(alpha 2, routing loss 0.01 and no token-level routing, cross-entropy on general answers, no "
        "irrelevance negatives, stage learning rates 2e-4/2e-4/2e-5, epochs 1/2/1, MOLoRA on 20%; the "
        "baselines at lr 2e-4 (lora) and 2e-5 (full) on tool data only). Settings given explicitly win."))
    budget: Budget | dict | None = field(default=None, metadata=_help("Caps on steps, tokens and seconds."))
    components: ComponentsConfig | dict | None = field(default=None, metadata=_help(
        "Component selection and adapter sizes."))
    hyperparameters: Hyperparameters | dict | None = field(default=None, metadata=_help(
        "Optimisation settings."))
    test_fraction: float = field(default=0.1, metadata=_help(
        "Without a validation_file: the fraction of tool examples held out as a test set (at least 3; "
        "0 turns the split and the evaluation off)."))
    checkpoint_every: int = field(default=200, metadata=_help(
        "Write a checkpoint every this many steps, besides each stage boundary (0: stage boundaries only)."))
    device: str | None = field(default=None, metadata=_help("cuda, cuda:N or cpu; default: cuda when visible."))
    dtype: str | None = field(default=None, metadata=_help(
        "Dtype of the frozen model: bf16 on GPU, fp32 on CPU by default. Trained weights stay fp32."))
    model_dirs: list[str] | None = field(default=None, metadata=_help(
        "When set, a local model path must lie inside one of these directories."))

    def __post_init__(self) -> None:
        if self.preset is not None:
            self._lay_preset_under()
        for name, cls in (("budget", Budget), ("components", ComponentsConfig), ("hyperparameters", Hyperparameters)):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, cls())
            elif isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, name))
            elif not isinstance(value, cls):
                raise ValueError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        for name in ("training_file", "out_dir", "model"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{name} is required: give a path" + (" or model spec" if name == "model" else ""))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be a whole number, got {self.seed!r}")
        if not _is_number(self.test_fraction) or not 0.0 <= self.test_fraction <= 0.5:
            raise ValueError(f"test_fraction must be between 0 and 0.5, got {self.test_fraction!r}; "
                             "pass a validation_file to test on separate data")
        if not isinstance(self.checkpoint_every, int) or isinstance(self.checkpoint_every, bool) \
                or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be a whole number >= 0, got {self.checkpoint_every!r}")
        if self.dtype in ("fp16", "float16"):
            raise ValueError("dtype fp16 is not supported for training (it needs loss scaling): use bf16 or fp32")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")

    def _lay_preset_under(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: use one of {', '.join(PRESETS)} (or leave it out "
                             "for our defaults)")
        for section, values in preset_values(self.preset, self.method).items():
            given = getattr(self, section)
            if given is None:
                given = {}
            if not isinstance(given, dict):
                raise ValueError(f"preset {self.preset!r} fills in the settings not given, so pass {section} as a "
                                 f"dict of the settings you set (got a {type(given).__name__})")
            setattr(self, section, {**values, **given})

    # -- stages -----------------------------------------------------------------------------------

    @property
    def stages(self) -> tuple[str, ...]:
        """The training stages this method runs, in order."""
        if self.method != "citi":
            return BASELINE_STAGES
        return CITI_STAGES if self.components.uco_fraction > 0 else CITI_STAGES[:2]

    def stage_epochs(self) -> list[float]:
        hp = self.hyperparameters
        if self.method == "citi":
            return [hp.epochs_router_pretraining, hp.epochs_molora, hp.epochs_uco][: len(self.stages)]
        return [hp.epochs_train]

    def stage_lrs(self) -> list[float]:
        hp = self.hyperparameters
        if self.method == "citi":
            return [hp.lr_router_pretraining, hp.lr_molora, hp.lr_uco][: len(self.stages)]
        if hp.lr_train is not None:
            return [hp.lr_train]
        return [1e-3 if self.method == "lora" else 1e-4]

    @property
    def uses_general_data(self) -> bool:
        return self.method == "citi" or self.hyperparameters.baselines_use_general

    # -- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """Build from a (possibly nested) dict; unknown keys are refused by name."""
        return _from_dict(cls, d, "config")


# The CITI paper's settings (method page): what `preset: paper` lays under a job's own settings.
_PAPER_CITI = {
    "components": {"molora_fraction": 0.20, "uco_fraction": 0.10, "num_experts": 4, "rank": 8, "alpha": 2.0},
    "hyperparameters": {
        "lr_router_pretraining": 2e-4, "lr_molora": 2e-4, "lr_uco": 2e-5,
        "epochs_router_pretraining": 1.0, "epochs_molora": 2.0, "epochs_uco": 1.0,
        "routing_beta": 0.01, "routing_token_weight": 0.0, "general_loss": "ce", "negatives_ratio": 0.0,
        "function_masking": 0.0, "replay_tools_fraction": 0.0,
    },
}
_PAPER_BASELINES = {
    "lora": {"lr_train": 2e-4, "epochs_train": 2.0},
    "full": {"lr_train": 2e-5, "epochs_train": 2.0},
}
PRESETS = ("paper",)


def preset_values(name: str, method: str) -> dict[str, dict[str, Any]]:
    """The settings a preset lays under a job's own, by section, for ``method``."""
    if name != "paper":
        raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    values = {k: dict(v) for k, v in _PAPER_CITI.items()}
    if method in _PAPER_BASELINES:
        values["hyperparameters"].update(_PAPER_BASELINES[method], baselines_use_general=False)
        values["components"].update(lora_rank=16, lora_alpha=16.0)
    return values


def _from_dict(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {where} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    try:
        return cls(**d)
    except TypeError as exc:  # a required field is missing
        raise ValueError(f"{where}: {exc}") from exc


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(obj: Any, name: str, where: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{where}.{name} must be a whole number >= 1, got {v!r}")

