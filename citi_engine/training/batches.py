"""Data order and batches for training and scoring.

Order is a pure function of the seed: stage ``s`` walks through the concatenation of its epochs'
permutations, each drawn from a generator seeded with ``(seed, s, epoch)``. Step ``k`` therefore
always sees the same examples, so a resumed run needs only its position, not a sampler state.

A step is always the same examples, however they are laid out: padded micro-batches of
``batch_size`` examples, or packed rows of at most ``pack_tokens`` tokens
(:mod:`citi_engine.packing`), and, with several data-parallel processes, each process's share of
them (:func:`rank_share`). Budgets, plans and checkpoints count steps and examples, so none of
them depends on the layout or on the number of processes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from citi_engine.packing import example_kind

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
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_type": task_type,
            "token_kind": token_kinds(examples, longest)}


def token_kinds(examples: Sequence[dict], width: int) -> torch.Tensor:
    """(B, width) long: each real token's example kind, -1 on padding (right-padded rows)."""
    out = torch.full((len(examples), width), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        out[i, : len(e["input_ids"])] = example_kind(e)
    return out


def micro_batches(examples: Sequence[dict], micro_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """One step's examples as ``ceil(len/micro_size)`` padded micro-batches."""
    return [collate(examples[i:i + micro_size], pad_id) for i in range(0, len(examples), micro_size)]


def step_batches(
    examples: Sequence[dict], *, micro_size: int, pad_id: int, pack_tokens: int | None = None
) -> list[dict]:
    """The micro-batches of one step's examples: padded groups of ``micro_size``, or, with
    ``pack_tokens``, packed rows of at most that many tokens (first-fit decreasing, examples whole)."""
    if pack_tokens is None:
        return micro_batches(examples, micro_size, pad_id)
    from citi_engine.packing import pack_examples

    return pack_examples(examples, max_tokens=pack_tokens, pad_id=pad_id, fixed_length=False)


def answer_tokens(examples: Sequence[dict]) -> int:
    """Tokens the loss trains on: labelled tokens that have a token before them (the first never does)."""
    return sum(sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX) for e in examples)


def rank_share(
    examples: Sequence[dict], *, rank: int, world_size: int, micro_size: int, balance_tokens: bool = False
) -> list[dict]:
    """Process ``rank``'s part of one step's examples when ``world_size`` processes train together.

    Every process computes every share from the same examples, so they agree without talking.
    Padded (``balance_tokens`` false): the step's micro-batches of ``micro_size`` are dealt out in
    turn when there are at least ``world_size`` of them, so each process trains exactly the
    micro-batches one process would; otherwise the examples are split into ``world_size`` runs
    as equal as possible. Packed (``balance_tokens``): longest example first to the process with
    the fewest tokens so far, so every process packs about the same number of tokens.
    Each share keeps the step's order. A step needs at least one example per process.
    """
    n = len(examples)
    if world_size <= 1:
        return list(examples)
    if n < world_size:
        raise ValueError(f"a step of {n} example(s) cannot be shared by {world_size} processes: raise batch_size "
                         "x gradient_accumulation_steps to at least the number of processes")
    if balance_tokens:
        load = [0] * world_size
        owner = [0] * n
        for i in sorted(range(n), key=lambda i: (-len(examples[i]["input_ids"]), i)):
            r = min(range(world_size), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += len(examples[i]["input_ids"])
        # None is left empty: each of the first world_size examples goes to a process that has none yet.
        return [examples[i] for i in range(n) if owner[i] == rank]
    groups = [list(range(i, min(i + micro_size, n))) for i in range(0, n, micro_size)]
    if len(groups) >= world_size:
        return [examples[i] for g in groups[rank::world_size] for i in g]
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(examples[start:start + base + (1 if rank < extra else 0)])


def routing_token_counts(examples: Sequence[dict]) -> tuple[int, int]:
    """Tokens the token-level routing objective counts in a step: ``(backbone, experts)``, i.e. every token of
    the GENERAL examples and the positions that write the TOOL examples' answers (whose next token is labelled)."""
    backbone = experts = 0
    for e in examples:
        kind = example_kind(e)
        if kind == 0:
            backbone += len(e["input_ids"])
        elif kind == 1:
            experts += sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX)
    return backbone, experts


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
