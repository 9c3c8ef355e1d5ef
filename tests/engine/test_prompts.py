"""The built-in general prompt pools: replay (trained on) and probes (evaluation only) never share a prompt."""

from __future__ import annotations

from citi_engine.data.prompts import PROBE_PROMPTS, PROMPT_KINDS, REPLAY_PROMPTS, prompt_kind


def _norm(prompt: str) -> str:
    return " ".join(prompt.lower().split()).rstrip(".?!")


def test_each_pool_has_at_least_200_distinct_prompts_of_every_kind():
    for pool in (REPLAY_PROMPTS, PROBE_PROMPTS):
        assert len(pool) >= 200
        assert len({_norm(p) for p in pool}) == len(pool), "a prompt is repeated within a pool"
        assert len(pool) == 20 * len(PROMPT_KINDS)
        assert {prompt_kind(i) for i in range(len(pool))} == set(PROMPT_KINDS)


def test_replay_and_probe_pools_are_disjoint():
    shared = {_norm(p) for p in REPLAY_PROMPTS} & {_norm(p) for p in PROBE_PROMPTS}
    assert not shared, sorted(shared)[:5]
