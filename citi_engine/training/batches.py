"""Data order and batches for training and scoring.

Order is a pure function of the seed: stage ``s`` walks through the concatenation of its epochs'
permutations, each drawn from a generator seeded with ``(seed, s, epoch)``. Step ``k`` therefore
always sees the same examples, so a resumed run needs only its position, not a sampler state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def epoch_permutation(n: int, *, seed: int, stage_index: int, epoch: int) -> list[int]:
    """The order of ``n`` examples in one epoch of one stage."""
    gen = torch.Generator().manual_seed(_mix(seed, stage_index, epoch))
    return torch.randperm(n, generator=gen).tolist()


def _mix(*parts: int) -> int:
    # A fixed, platform-independent way to derive one 63-bit seed from several integers.
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def natural_steps(n_examples: int, epochs: float, examples_per_step: int) -> int:
    """Optimizer steps that ``epochs`` passes over ``n_examples`` take (at least one)."""
    return max(1, math.ceil(n_examples * epochs / examples_per_step))


class StageOrder:
    """Which examples each step of one stage trains on."""

    def __init__(self, n_examples: int, *, seed: int, stage_index: int, examples_per_step: int):
        if n_examples < 1:
            raise ValueError("a stage needs at least one example")
        self.n = n_examples
        self.seed = seed
        self.stage_index = stage_index
        self.per_step = examples_per_step
        self._epochs: dict[int, list[int]] = {}

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._epochs:
            self._epochs = {epoch: epoch_permutation(self.n, seed=self.seed, stage_index=self.stage_index,
                                                     epoch=epoch)}
        return self._epochs[epoch][offset]

    def indices(self, step: int) -> list[int]:
        """Example indices of step ``step`` (0-based); a step may span two epochs."""
        start = step * self.per_step
        return [self._at(p) for p in range(start, start + self.per_step)]


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (see CONTRACTS, "Batches") from encoded examples.

    Right padding: left padding gives NaN gradients under sdpa on GPU.
    """
    longest = max(len(e["input_ids"]) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, longest), pad_id, dtype=torch.long)
    labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    task_type = torch.tensor([int(e["task_type"]) for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_type": task_type}


def micro_batches(examples: Sequence[dict], micro_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """One step's examples as ``ceil(len/micro_size)`` padded micro-batches."""
    return [collate(examples[i:i + micro_size], pad_id) for i in range(0, len(examples), micro_size)]


def count_tokens(examples: Sequence[dict]) -> int:
    """Tokens a step trains on: every non-padding token, prompt included."""
    return sum(len(e["input_ids"]) for e in examples)


def sample_indices(n: int, k: int, *, seed: int, salt: int) -> list[int]:
    """``min(k, n)`` distinct indices out of ``n``, sorted, reproducible from ``seed`` and ``salt``."""
    if k >= n:
        return list(range(n))
    return sorted(random.Random(_mix(seed, salt)).sample(range(n), k))


def split_test(tool_indices: list[int], fraction: float, *, seed: int, minimum: int = 3) -> tuple[list[int], list[int]]:
    """Hold out ``fraction`` of the tool examples (at least ``minimum``) as a test split.

    Returns ``(train, test)`` index lists. No split when ``fraction`` is 0 or when holding out
    the minimum would leave fewer training than test examples.
    """
    if fraction <= 0:
        return list(tool_indices), []
    n_test = max(minimum, round(fraction * len(tool_indices)))
    if len(tool_indices) - n_test < n_test:
        return list(tool_indices), []
    chosen = set(random.Random(_mix(seed, 7919)).sample(list(tool_indices), n_test))
    train = [i for i in tool_indices if i not in chosen]
    test = [i for i in tool_indices if i in chosen]
    return train, test
