"""The configuration of a fine-tuning job: one plain dataclass, every field with its own help text.

Torch-free, so the API can check a job's parameters at submit time with the same rules the engine
applies. :class:`FinetuneConfig` refuses impossible combinations in ``__post_init__`` with a
ValueError that says why and how to fix it.

Defaults. The paper's values (alpha=2, beta=0.01, epochs 1/2/1, lr 2e-4/2e-4/2e-5) learn almost
nothing at the data sizes our users bring (hundreds to a few thousand examples). The defaults below
are the winners of the quality benchmark's validation sweep (bench/results/quality_sweep.md: SmolLM2,
810 BFCL training examples, 120 validation cases whose functions are unseen, chosen by tool accuracy):
CITI stage-2 lr 1e-3, alpha 32, MOLoRA on 50% of the components; LoRA lr 1e-3; full fine-tuning lr 1e-4.
Each field's help gives the paper's value beside ours. Not swept (kept from the prototype): beta 5e-4,
3 stage-2 epochs, stage-1/3 learning rates, ranks and expert count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from citi_engine import DECODE_MODES, DEFAULT_MODEL, ROUTING_BALANCES, ROUTING_GATES
from citi_engine.budget import Budget
from citi_engine.ranges import Range, SettingError, check_ranges, setting

METHODS = ("citi", "lora", "full")
GENERAL_LOSSES = ("kl", "ce")
DTYPES = ("auto", "bf16", "bfloat16", "fp32", "float32")

# Stage names as the events and the checkpoints spell them.
CITI_STAGES = ("router_pretraining", "molora", "uco")
BASELINE_STAGES = ("train",)
# lr_train when not given, by method: the winners of our sweep (see lr_train's help).
DEFAULT_LR_TRAIN = {"lora": 1e-3, "full": 1e-4}


# Ranges several settings share.
_LR = Range(0.0, 1.0, lo_open=True)
_EPOCHS = Range(0.0, 1000.0, lo_open=True)
_NEW_TOKENS = Range(1, 8192, whole=True)


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ComponentsConfig:
    """Which components get adapted and how big the adapters are (the parameter budget)."""

    molora_fraction: float = setting(
        0.50,
        "Fraction of components (top by tool importance) that get MOLoRA. Paper: 0.20. Chosen on our validation "
        "split: 0.10 / 0.20 / 0.30 gave tool accuracy 0.33 / 0.44 / 0.47 in the first sweep; with the method "
        "issue's data and losses, 0.30 / 0.50 gave 0.433 / 0.492 at headline retention 0.956 / 0.955 (one H100, "
        "seed 0, bench/results/quality_method_val.md).",
        Range(0.0, 1.0, lo_open=True, hi_open=True),
    )
    uco_fraction: float = setting(
        0.10,
        "Fraction of components (bottom by general importance) fully fine-tuned in stage 3. Paper: 0.10. "
        "0 runs no stage 3 (an ablation: CITI without UCO).",
        Range(0.0, 1.0, hi_open=True),
    )
    num_experts: int = setting(
        4,
        "LoRA experts per MOLoRA component. Paper: 4.",
        Range(1, 64, whole=True),
    )
    rank: int = setting(
        8,
        "Rank of each MOLoRA expert. Paper: 8.",
        Range(1, 1024, whole=True),
    )
    alpha: float = setting(
        32.0,
        "MOLoRA scaling numerator: experts are scaled by alpha/rank. Paper: 2 (scale 0.25), which "
        "learned almost nothing at small data sizes; 32 (scale 4) led our sweep over 16 and 32.",
        Range(0.0, 10_000.0, lo_open=True),
    )
    lora_rank: int = setting(
        16,
        "Rank of the LoRA baseline (method=lora). Paper: 16.",
        Range(1, 1024, whole=True),
    )
    lora_alpha: float = setting(
        16.0,
        "Alpha of the LoRA baseline (method=lora). Paper: 16.",
        Range(0.0, 10_000.0, lo_open=True),
    )
    selection: str = setting(
        "importance",
        "How the MOLoRA and UCO components are chosen: importance (the method) or random (an "
        "ablation: sets of the same sizes drawn with the job's seed, scores ignored).",
    )

    def __post_init__(self) -> None:
        check_ranges(self, "components")
        if self.selection not in ("importance", "random"):
            raise SettingError(f"components.selection must be 'importance' or 'random', got {self.selection!r}",
                               param="components.selection")
        if self.molora_fraction + self.uco_fraction > 1.0:
            raise SettingError(
                f"components.molora_fraction + uco_fraction = {self.molora_fraction + self.uco_fraction:g} > 1: "
                "a component is never both MOLoRA and UCO, so together they can cover at most all components",
                param="components.uco_fraction",
            )


@dataclass
class Hyperparameters:
    """Optimisation settings. Learning rates and epochs are per stage."""

    batch_size: int = setting(
        16,
        "Examples per optimizer step (before accumulation). Paper: 4x4.",
        Range(1, 4096, whole=True),
    )
    gradient_accumulation_steps: int = setting(
        1,
        "Micro-batches summed into one optimizer step; the step sees batch_size x this.",
        Range(1, 1024, whole=True),
    )
    lr_router_pretraining: float = setting(
        2e-4,
        "Peak learning rate of stage 1, router pre-training (citi). Paper: 2e-4.",
        _LR,
    )
    lr_molora: float = setting(
        1e-3,
        "Peak learning rate of stage 2, MOLoRA improvement (citi). Paper: 2e-4; 1e-3 led our sweep "
        "over 5e-4, 1e-3 and 2e-3 (2e-3 tied on tool accuracy with lower retention).",
        _LR,
    )
    lr_uco: float = setting(
        2e-5,
        "Peak learning rate of stage 3, UCO full-weight training (citi). Paper: 2e-5.",
        _LR,
    )
    lr_train: float | None = setting(
        None,
        "Peak learning rate of the single stage of the lora/full baselines. Default by method: "
        "lora 1e-3, full 1e-4, the winners of our sweep (the paper's baselines: 2e-4 and 2e-5, which "
        "underfit at our data sizes).",
        _LR,
    )
    epochs_router_pretraining: float = setting(
        1.0,
        "Epochs of stage 1 over the mixed data (citi). Paper: 1.",
        _EPOCHS,
    )
    epochs_molora: float = setting(
        3.0,
        "Epochs of stage 2 over the mixed data (citi). Paper: 2.",
        _EPOCHS,
    )
    epochs_uco: float = setting(
        1.0,
        "Epochs of stage 3 over the mixed data (citi). Paper: 1.",
        _EPOCHS,
    )
    epochs_train: float = setting(
        2.0,
        "Epochs of the lora/full baselines. Paper: 2.",
        _EPOCHS,
    )
    warmup_ratio: float = setting(
        0.1,
        "Fraction of each stage's steps spent warming up (cosine schedule after). The first step "
        "already uses a nonzero learning rate. Paper: 0.1.",
        Range(0.0, 1.0, hi_open=True),
    )
    weight_decay: float = setting(
        0.0,
        "AdamW weight decay.",
        Range(0.0, 10.0),
    )
    max_grad_norm: float = setting(
        1.0,
        "Clip gradients to this norm; 0 turns clipping off.",
        Range(0.0, 10_000.0),
    )
    routing_beta: float = setting(
        5e-4,
        "Weight of the routing loss added to the cross-entropy (summed over MOLoRA layers). "
        "Paper: 0.01, which dominated the cross-entropy at small data sizes.",
        Range(0.0, 100.0),
    )
    routing_beta_per_layer: bool = setting(
        False,
        "Treat routing_beta as a total spread over the layers: divide it by the number of MOLoRA "
        "layers, so the routing term's weight does not grow with model depth.",
    )
    routing_delta: float = setting(
        0.95,
        "delta of the localized balancing constraint (0 < delta < 1). Paper: 0.95.",
        Range(0.0, 1.0, lo_open=True, hi_open=True),
    )
    routing_token_weight: float = setting(
        0.1,
        "Weight of the token-level routing objective (not in the paper): on every MOLoRA layer, the "
        "backbone gate G(x)[0] is trained towards 1 on the tokens of general examples and towards 0 "
        "on the tokens that write a tool call (binary cross-entropy, the two kinds averaged "
        "apart, then over layers). 0 turns it off; routing_beta is the paper's batch-level loss, "
        "which can be used beside it.",
        Range(0.0, 100.0),
    )
    routing_balance: str = setting(
        "mean",
        "How the balancing loss (routing_beta) totals each example's router weights: sum over its tokens (the "
        "paper's) or mean (not in the paper: the loss then compares how examples route, not how long they are; "
        "with sums, long tool examples beside short general ones push the general tokens' weight to the experts). "
        "mean was chosen on our validation split (bench/results/quality_router_val.md): the same tool accuracy, "
        "general retention 0.985 against 0.977.",
    )
    routing_gate: str = setting(
        "softmax",
        "How each MOLoRA router weighs the backbone against its experts: softmax (the paper's: one softmax over "
        "the backbone neuron and the experts) or sigmoid (not in the paper: the backbone's share is a sigmoid of "
        "its own logit and the experts share the rest by a softmax among themselves; the balancing loss "
        "(routing_beta) then balances the experts among themselves and leaves the backbone's share to "
        "routing_token_weight, so the two no longer pull on one softmax). Saved with the adapter; the server "
        "computes the same.",
    )
    routing_detach: bool = setting(
        False,
        "Train each router by the routing terms alone (not in the paper): the experts' weights G(x)[1:] reach "
        "the layer's output detached, so the answer loss trains the experts and leaves the router to the "
        "token-level objective (and routing_beta's balancing); the router becomes a classifier of general "
        "against tool-call tokens, which the answer loss no longer pulls towards the experts. Needs "
        "routing_token_weight > 0.",
    )
    routing_detach_input: bool = setting(
        False,
        "Each router reads its layer's input without the input's gradient (not in the paper): the routing terms "
        "train the routers' own weights and nothing below them, so a strong routing_token_weight cannot reshape "
        "the model's hidden states to make routing easier (the way it cost general behaviour when it was raised). "
        "Costs one extra matmul per MOLoRA layer in training (the router and experts no longer share one).",
    )
    general_loss: str = setting(
        "kl",
        "Loss on the answers of general examples: kl (soft targets, not in the paper: the KL from "
        "the frozen base model's next-token distribution, computed in the same step with the "
        "adapters switched off, or from a frozen copy for full fine-tuning) or ce (cross-entropy on "
        "the answer text, the paper's way).",
    )
    negatives_ratio: float = setting(
        0.25,
        "Irrelevance negatives built from the job's own tool examples, per tool example: a request "
        "paired with a tool list that lacks the function it needs (the called functions dropped, or "
        "tools taken from another example), answered in plain text that no tool fits. 0 turns "
        "them off.",
        Range(0.0, 4.0),
    )
    negatives_near: float = setting(
        0.5,
        "Share of the irrelevance negatives built as near misses: their tools come from the example (of up to 200 "
        "drawn) whose functions share the most words with the request, a function close to what is asked that "
        "does not do it, rather than from a random one. 0 turns it off. The default was chosen on the validation "
        "side among 0, 0.5 and 1 (bench/results/quality_near_val.md): 0.5 answered 7 points more of the requests "
        "over unseen functions that no tool fits without a call, at the same tool accuracy and retention.",
        Range(0.0, 1.0),
    )
    function_masking: float = setting(
        0.0,
        "Fraction of tool examples whose function and parameter names are replaced by neutral ones "
        "(func_1, param_1, ...) in the tools and the calls, so the model learns to read the "
        "descriptions rather than the names (as in the Hammer paper). 0 turns it off.",
        Range(0.0, 1.0),
    )
    replay_tools_fraction: float = setting(
        0.5,
        "Share of the replay prompts (general data the base model answers itself) asked with an "
        "unrelated tool list from the job's own data in the system turn, so the tuned model keeps "
        "answering general questions as before when tools are offered. 0: no tools in replay.",
        Range(0.0, 1.0),
    )
    max_length: int = setting(
        2048,
        "Longest example in tokens; longer examples are refused by the validator.",
        Range(16, 131_072, whole=True),
    )
    importance_examples: int = setting(
        512,
        "Examples sampled per set (tool, general) to score component importance. "
        "Paper: up to 3000.",
        Range(1, 100_000, whole=True),
    )
    importance_batch_size: int | None = setting(
        None,
        "Batch size while scoring importance; default: batch_size.",
        Range(1, 4096, whole=True),
    )
    replay_examples: int = setting(
        128,
        "General examples built by letting the base model answer built-in prompts, when the "
        "job brings no general data (citi needs both task types).",
        Range(1, 100_000, whole=True),
    )
    replay_max_new_tokens: int = setting(
        256,
        "Longest replay answer the base model may write, in tokens.",
        _NEW_TOKENS,
    )
    eval_examples: int = setting(
        200,
        "Most tool test examples evaluated at the end (0: no evaluation).",
        Range(0, 100_000, whole=True),
    )
    eval_probes: int = setting(
        64,
        "Most general probe prompts used to measure retention at the end.",
        Range(0, 10_000, whole=True),
    )
    eval_max_new_tokens: int = setting(
        256,
        "Longest reply generated per test case during evaluation, in tokens.",
        _NEW_TOKENS,
    )
    eval_humaneval: int = setting(
        32,
        "HumanEval problems whose canonical solutions' NLL measures code retention at "
        "the end (0: skip).",
        Range(0, 1000, whole=True),
    )
    call_threshold: float | None = setting(
        None,
        "How sure the tuned model must be before a reply opens with a tool call: served with a bias of minus this "
        "on the first token of <tool_call> (tool_choice auto), so requests no offered tool fits get text. Default "
        "(unset): chosen at the end of the job on its held-out tool examples (the test split or validation_file; "
        "with requests none of whose tools fits built from them when the set has none) as the threshold with the "
        "best balanced accuracy between calls kept and calls wrongly made; 0 when the job does not evaluate. "
        "0 turns it off; a number sets it.",
        Range(0.0, 100.0),
    )
    generation_batch_size: int | None = setting(
        None,
        "Replies generated at once (greedy) when the job writes its replay answers and when it evaluates. "
        "Default: 64 on a GPU, where decoding a few rows costs about what decoding many does, and batch_size "
        "on CPU. A batch the device has no memory for is generated again in halves.",
        Range(1, 4096, whole=True),
    )
    generation_decode: str = setting(
        "auto",
        "KV cache of the decode loop when the job writes its replay answers and its greedy tool replies in "
        "evaluation: auto (cuda_graphs on a GPU, dynamic elsewhere; the inference server's default too, so served "
        "replies decode as the evaluation's did), dynamic (grows with the replies), static (allocated once per "
        "batch), cuda_graphs (static, each step replayed from a CUDA graph on a GPU: far fewer kernel launches for "
        "a small model; static on CPU) or compiled_graphs (cuda_graphs with the step compiled by torch.compile "
        "first: fused kernels). The same replies up to the device's arithmetic (tested on CPU token for token).",
    )
    baselines_use_general: bool = setting(
        False,
        "Let the lora/full baselines train on the general examples too. Off by default: the "
        "paper's baselines train on tool data only.",
    )
    packing: bool | None = setting(
        None,
        "Pack several examples into each micro-batch row (positions restart and attention stays "
        "inside each example), so no compute goes to padding; the loss and the gradients are those "
        "of padded batches. Default: on when training in bf16 on a GPU whose variable-length attention "
        "kernel passes its self-check at start, off otherwise (on CPU). true packs anyway (SDPA "
        "with a block-diagonal mask where that kernel is missing); false pads.",
    )
    pack_tokens: int | None = setting(
        None,
        "Most tokens in one packed row (when packing). Default: batch_size x max_length, the most "
        "a padded micro-batch can hold, so packing never needs more memory than padding. Also the "
        "row size while scoring importance (default there: importance_batch_size x max_length).",
        Range(16, 1_048_576, whole=True),
    )

    def __post_init__(self) -> None:
        check_ranges(self, "hyperparameters")
        if self.general_loss not in GENERAL_LOSSES:
            raise SettingError(f"hyperparameters.general_loss must be one of {', '.join(GENERAL_LOSSES)}, got "
                               f"{self.general_loss!r}", param="hyperparameters.general_loss")
        if self.generation_decode not in DECODE_MODES:
            raise SettingError(f"hyperparameters.generation_decode must be one of {', '.join(DECODE_MODES)}, got "
                               f"{self.generation_decode!r}", param="hyperparameters.generation_decode")
        if self.routing_balance not in ROUTING_BALANCES:
            raise SettingError(f"hyperparameters.routing_balance must be one of {', '.join(ROUTING_BALANCES)}, got "
                               f"{self.routing_balance!r}", param="hyperparameters.routing_balance")
        if self.routing_gate not in ROUTING_GATES:
            raise SettingError(f"hyperparameters.routing_gate must be one of {', '.join(ROUTING_GATES)}, got "
                               f"{self.routing_gate!r}", param="hyperparameters.routing_gate")
        if not isinstance(self.routing_detach, bool):
            raise SettingError(f"hyperparameters.routing_detach must be true or false, got {self.routing_detach!r}",
                               param="hyperparameters.routing_detach")
        if not isinstance(self.routing_detach_input, bool):
            raise SettingError("hyperparameters.routing_detach_input must be true or false, got "
                               f"{self.routing_detach_input!r}", param="hyperparameters.routing_detach_input")
        if self.routing_detach and self.routing_token_weight == 0:
            raise SettingError("hyperparameters.routing_detach trains the routers by the token-level routing "
                               "objective alone, and routing_token_weight is 0, so they would never train: set "
                               "routing_token_weight above 0 (default 0.1) or routing_detach to false",
                               param="hyperparameters.routing_detach")
        if self.packing is not None and not isinstance(self.packing, bool):
            raise SettingError(f"hyperparameters.packing must be true, false or null (automatic), got "
                               f"{self.packing!r}", param="hyperparameters.packing")
        if self.pack_tokens is not None and self.pack_tokens < self.max_length:
            raise SettingError(f"hyperparameters.pack_tokens={self.pack_tokens} is less than max_length="
                               f"{self.max_length}: a packed row must hold the longest example; raise pack_tokens "
                               "or lower max_length", param="hyperparameters.pack_tokens")


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
    seed: int = setting(
        0,
        "Seed for data order, sampling, splits and initialisation.",
        Range(0, 2**31 - 1, whole=True),
    )
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
    test_fraction: float = setting(
        0.1,
        "Without a validation_file: the fraction of tool examples held out as a test set (at least 3; "
        "0 turns the split and the evaluation off).",
        Range(0.0, 0.5),
    )
    checkpoint_every: int = setting(
        200,
        "Write a checkpoint every this many steps, besides each stage boundary (0: stage boundaries only).",
        Range(0, 10_000_000, whole=True),
    )
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
        check_ranges(self, "")
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
        return [DEFAULT_LR_TRAIN[self.method]]

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
        "routing_beta": 0.01, "routing_balance": "sum", "routing_gate": "softmax", "routing_token_weight": 0.0,
        "general_loss": "ce",
        "negatives_ratio": 0.0,
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
