"""Gradient-based component importance (method page, section 1).

For a component h with per-token output y_h(t) and the answer-token loss L:

    T_h(D) = (1/#tokens) * sum_t | <y_h(t), dL/dy_h(t)> |

Summed without the absolute value, sum_t <y_h(t), dL/dy_h(t)> equals theta_h . grad_theta_h L for a
bias-free linear layer, the first-order estimate of what zeroing h costs. Everything comes from the
outputs and their gradients (forward hooks plus tensor hooks), so no weight gradient is ever stored:
the weights are frozen and the input embeddings are made to require grad so backward still runs.

    M_h = T_h(D_tool) / sum_i T_i(D_tool)
    C_h = sum over general sets D_t of T_h(D_t) / sum_i T_i(D_t)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from citi_engine.components import MODULE_ORDER, component_info, list_components, select_components
from citi_engine.errors import Cancelled, CitiError
from citi_engine.files import write_json_atomic
from citi_engine.losses import causal_lm_loss

TOOL_SET = "tool"


class ImportanceProbe:
    """Hooks that accumulate sum_t |<y_h(t), dL/dy_h(t)>| over the real tokens of every component.

    Use as a context manager: on entry all weights are frozen, the model goes to eval mode (no dropout)
    and the hooks are installed; on exit everything is put back. ``signed=True`` drops the absolute
    value (used to check the hooks against weight gradients).
    """

    def __init__(self, model: nn.Module, components: list[str] | None = None, *, signed: bool = False):
        self.model = model
        self.components = components if components is not None else list_components(model)
        self.signed = signed
        self.totals: dict[str, torch.Tensor] = {}
        self.n_tokens: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._handles: list = []
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._was_training = False

    def __enter__(self) -> ImportanceProbe:
        modules = dict(self.model.named_modules())
        missing = [name for name in self.components if name not in modules]
        if missing:
            raise ValueError(f"components not found in the model: {missing[:5]}")
        self._saved_requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._saved_requires_grad:
            p.requires_grad_(False)
        self._was_training = self.model.training
        self.model.eval()
        # With every weight frozen nothing would require grad; a leaf at the embeddings lets backward reach the hooks.
        embeddings = self.model.get_input_embeddings()
        self._handles.append(embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
        for name in self.components:
            self._handles.append(modules[name].register_forward_hook(self._output_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self.model.train(self._was_training)

    def _output_hook(self, name: str):
        def hook(_module, _inputs, output):
            if not (torch.is_tensor(output) and output.requires_grad):
                return
            y = output.detach()
            mask = self._mask

            def on_grad(grad: torch.Tensor) -> None:
                dtype = torch.promote_types(y.dtype, torch.float32)
                per_token = (y.to(dtype) * grad.to(dtype)).sum(-1)  # <y_h(t), dL/dy_h(t)>, shape (B, T)
                if not self.signed:
                    per_token = per_token.abs()
                total = (per_token * mask.to(dtype)).sum()
                self.totals[name] = total if name not in self.totals else self.totals[name] + total

            output.register_hook(on_grad)

        return hook

    def step(self, batch: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> None:
        """Forward and backward one batch, accumulating into ``totals`` and ``n_tokens``.

        A padded batch (dict per CONTRACTS) or a packed one from :mod:`citi_engine.packing` (no attention
        mask; ``sequence_mask`` marks the real tokens and attention stays inside each sequence).
        """
        if device is None:
            device = next(self.model.parameters()).device
        if "cu_seq_lens" in batch:  # packed
            inputs = dict(batch)
            mask = batch["sequence_mask"].to(device, non_blocking=True).any(0, keepdim=True)
        else:
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            attention_mask = batch.get("attention_mask")
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
            inputs = {"input_ids": input_ids, "attention_mask": mask, "labels": batch["labels"]}
        self._mask = mask
        with torch.enable_grad():
            # The output head runs on answer positions only (chunked), so no (batch x length x vocab) fp32 logits
            # are held: scoring importance needs no more memory than a training step.
            loss, _ = causal_lm_loss(self.model, inputs, reduction="sum")
            loss.backward()
        n = mask.sum()
        self.n_tokens = n if self.n_tokens is None else self.n_tokens + n
        self._mask = None


def compute_importance(
    model: nn.Module,
    batches_by_set: Mapping[str, Iterable[Mapping[str, torch.Tensor]]],
    *,
    should_cancel: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
    device: torch.device | str | None = None,
) -> ImportanceScores:
    """T_h for every component and every data set: the mean over real tokens of |<y_h, dL/dy_h>|.

    ``batches_by_set`` maps a set name to its batches; ``"tool"`` is the tool set, every other key is
    a general set. ``should_cancel()`` is checked before every batch (raises :class:`Cancelled`);
    ``on_progress(batches_done, total_batches_or_None)`` is called after every batch. No weight
    gradient is stored and every ``requires_grad`` flag is restored afterwards.
    """
    if TOOL_SET not in batches_by_set:
        raise ValueError(f"batches_by_set needs a '{TOOL_SET}' set (got {sorted(batches_by_set)})")
    components = list_components(model)
    if not components:
        raise ValueError("the model has no decoder-layer linear projections to score")
    sizes = [len(b) if hasattr(b, "__len__") else None for b in batches_by_set.values()]
    total = None if None in sizes else sum(sizes)
    T: dict[str, dict[str, float]] = {}
    n_examples: dict[str, int] = {}
    n_tokens: dict[str, int] = {}
    done = 0
    for set_name, batches in batches_by_set.items():
        examples = 0
        with ImportanceProbe(model, components) as probe:
            for batch in batches:
                if should_cancel is not None and should_cancel():
                    raise Cancelled("the job was cancelled while scoring component importance")
                probe.step(batch, device=device)
                # A packed row holds several examples; task_type has one entry per example either way.
                tt = batch.get("task_type")
                examples += int(tt.numel()) if tt is not None else int(batch["input_ids"].shape[0])
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
        tokens = int(probe.n_tokens.item()) if probe.n_tokens is not None else 0
        if tokens == 0:
            raise CitiError(f"the '{set_name}' set gave no tokens to score importance on: give it at least one example",
                            code="no_importance_data")
        # One host sync per set: every running total stayed on the device until here.
        zero = torch.zeros((), dtype=torch.float64, device=probe.n_tokens.device)
        values = torch.stack([probe.totals[n].double() if n in probe.totals else zero for n in components]).cpu()
        T[set_name] = dict(zip(components, (values / tokens).tolist(), strict=True))
        n_examples[set_name] = examples
        n_tokens[set_name] = tokens
    return ImportanceScores(T=T, n_examples=n_examples, n_tokens=n_tokens)


@dataclass
class ImportanceScores:
    """What :func:`compute_importance` measured: ``T[set][component]`` plus the examples and tokens per set."""

    T: dict[str, dict[str, float]]
    n_examples: dict[str, int] = field(default_factory=dict)
    n_tokens: dict[str, int] = field(default_factory=dict)


def _normalised(scores: Mapping[str, float], set_name: str) -> dict[str, float]:
    total = sum(scores.values())
    if not total > 0:
        raise CitiError(
            f"every component scored zero on the '{set_name}' set: its examples need answer tokens "
            "(assistant turns that are not masked out)",
            code="no_importance_data",
        )
    return {name: value / total for name, value in scores.items()}


def _json_set_key(set_name: str) -> str:
    return TOOL_SET if set_name == TOOL_SET else "general/" + set_name.removeprefix("general/")


@dataclass
class ImportanceResult:
    """Tool importance M, general importance C, and the chosen MOLoRA and UCO components."""

    components: list[str]
    T: dict[str, dict[str, float]]
    M: dict[str, float]
    C: dict[str, float]
    molora: list[str]
    uco: list[str]
    n_examples: dict[str, int]

    @classmethod
    def from_scores(
        cls, scores: ImportanceScores, *, molora_fraction: float, uco_fraction: float,
        selection: str = "importance", seed: int = 0,
    ) -> ImportanceResult:
        """Normalise each set, sum the general sets into C, and select the components (see components.py)."""
        general = [s for s in scores.T if s != TOOL_SET]
        if TOOL_SET not in scores.T or not general:
            raise CitiError(
                "importance needs a tool set and at least one general set (general data, or the built-in replay)",
                code="no_importance_data",
            )
        components = list(scores.T[TOOL_SET])
        M = _normalised(scores.T[TOOL_SET], TOOL_SET)
        C = dict.fromkeys(components, 0.0)
        for set_name in general:
            for name, value in _normalised(scores.T[set_name], set_name).items():
                C[name] += value
        molora, uco = select_components(M, C, molora_fraction, uco_fraction, selection=selection, seed=seed)
        n_general = sum(scores.n_examples.get(s, 0) for s in general)
        return cls(
            components=components,
            T={s: dict(v) for s, v in scores.T.items()},
            M=M,
            C=C,
            molora=molora,
            uco=uco,
            n_examples={"tool": scores.n_examples.get(TOOL_SET, 0), "general": n_general},
        )

    def to_json(self) -> dict:
        """The ``importance.json`` document (shape in docs/CONTRACTS.md)."""
        rows = []
        for name in self.components:
            layer, module = component_info(name)
            rows.append({
                "name": name,
                "layer": layer,
                "module": module,
                "tool": self.M[name],
                "general": self.C[name],
                "T": {_json_set_key(s): values[name] for s, values in self.T.items()},
            })
        return {"components": rows, "molora": list(self.molora), "uco": list(self.uco), "n_examples": dict(self.n_examples)}

    @classmethod
    def from_json(cls, doc: Mapping) -> ImportanceResult:
        """Read back what :meth:`to_json` wrote (used when a job resumes)."""
        rows = doc["components"]
        components = [r["name"] for r in rows]
        T: dict[str, dict[str, float]] = {}
        for r in rows:
            for key, value in r["T"].items():
                set_name = key if key == TOOL_SET else key.removeprefix("general/")
                T.setdefault(set_name, {})[r["name"]] = float(value)
        return cls(
            components=components,
            T=T,
            M={r["name"]: float(r["tool"]) for r in rows},
            C={r["name"]: float(r["general"]) for r in rows},
            molora=list(doc["molora"]),
            uco=list(doc["uco"]),
            n_examples=dict(doc.get("n_examples", {})),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImportanceResult:
        """Load ``importance.json`` from a file or from the directory holding it."""
        path = Path(path)
        if path.is_dir():
            path = path / "importance.json"
        return cls.from_json(json.loads(path.read_text()))

    def save(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``importance.json`` and the ``importance.png`` heat map into ``out_dir``; return both paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path = write_json_atomic(out / "importance.json", self.to_json())
        png_path = out / "importance.png"
        self.plot(png_path)
        return json_path, png_path

    def plot(self, path: str | os.PathLike) -> None:
        """Heat map, layers x module types, tool importance M beside general importance C.

        MOLoRA components carry a white frame, UCO components a red cross, on both panels.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.lines import Line2D
        from matplotlib.patches import Rectangle

        info = {name: component_info(name) for name in self.components}
        layers = sorted({layer for layer, _ in info.values()})
        present = {module for _, module in info.values()}
        modules = [m for m in MODULE_ORDER if m in present] + sorted(present - set(MODULE_ORDER))
        row = {layer: i for i, layer in enumerate(layers)}
        col = {module: j for j, module in enumerate(modules)}

        def grid(values: Mapping[str, float]):
            g = np.full((len(layers), len(modules)), np.nan)
            for name, (layer, module) in info.items():
                g[row[layer], col[module]] = values[name]
            return g

        height = max(3.0, 0.28 * len(layers) + 1.8)
        fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.1 * len(modules) * 2, height), squeeze=False)
        panels = [("tool importance M", self.M), ("general importance C", self.C)]
        for ax, (title, values) in zip(axes[0], panels, strict=True):
            image = ax.imshow(grid(values), aspect="auto", cmap="viridis", interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(title)
            ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
            ax.set_xlabel("module")
            ax.set_ylabel("layer")
            for name in self.molora:
                layer, module = info[name]
                ax.add_patch(Rectangle((col[module] - 0.5, row[layer] - 0.5), 1, 1, fill=False, edgecolor="white", lw=2))
            for name in self.uco:
                layer, module = info[name]
                ax.plot(col[module], row[layer], marker="x", color="red", markersize=8, mew=2)
        legend = [
            Rectangle((0, 0), 1, 1, fill=False, edgecolor="gray", lw=2, label=f"MOLoRA ({len(self.molora)})"),
            Line2D([], [], marker="x", color="red", linestyle="none", mew=2, label=f"UCO ({len(self.uco)})"),
        ]
        fig.legend(handles=legend, loc="lower center", ncol=2, frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.savefig(path, dpi=110)
        plt.close(fig)
