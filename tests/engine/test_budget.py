"""Budgets: planning steps per stage, refusing hopeless budgets before loading, and stopping real runs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from citi_engine.budget import Budget, StagePlan, check_budget, plan_stages, split_in_proportion
from citi_engine.errors import BudgetError
from tests.engine.test_train import small_config, tiny_model, write_data  # noqa: F401  (tiny_model: fixture)

CITI = ["router_pretraining", "molora", "uco"]


# ------------------------------------------------------------------------------------------ planning


@pytest.mark.parametrize("total", [3, 4, 5, 7, 10, 101])
def test_steps_are_split_by_epochs_and_every_stage_gets_one(total):
    parts = split_in_proportion(total, [1, 3, 1])
    assert sum(parts) == total and min(parts) >= 1
    assert parts[1] >= parts[0] and parts[1] >= parts[2]


def test_a_step_cap_is_spread_over_stages_in_proportion_to_their_epochs():
    plan = plan_stages(CITI, [1, 3, 1], [50, 150, 50], Budget(max_steps=10), tokens_per_step=100)
    assert plan.steps == [2, 6, 2] and plan.total_steps == 10


def test_no_cap_runs_the_epochs_and_a_cap_never_adds_steps():
    assert plan_stages(CITI, [1, 3, 1], [4, 12, 4], Budget(), tokens_per_step=100).steps == [4, 12, 4]
    assert plan_stages(CITI, [1, 3, 1], [4, 12, 4], Budget(max_steps=1000), tokens_per_step=100).steps == [4, 12, 4]


def test_a_token_cap_becomes_steps_and_cumulative_stage_limits():
    plan = plan_stages(CITI, [1, 3, 1], [50, 150, 50], Budget(max_tokens=1000), tokens_per_step=100)
    assert plan.steps == [2, 6, 2]
    assert plan.token_limits == [200, 800, 1000]


def test_the_tightest_cap_wins():
    plan = plan_stages(CITI, [1, 3, 1], [50, 150, 50], Budget(max_steps=20, max_tokens=500), tokens_per_step=100)
    assert plan.total_steps == 5


def test_too_small_step_and_token_budgets_name_the_minimum():
    with pytest.raises(BudgetError, match="at least 3 steps"):
        check_budget(Budget(max_steps=2), n_stages=3, tokens_per_step=100)
    with pytest.raises(BudgetError, match="raise max_tokens to 300"):
        check_budget(Budget(max_tokens=299), n_stages=3, tokens_per_step=100)
    check_budget(Budget(max_steps=3, max_tokens=300), n_stages=3, tokens_per_step=100)
    check_budget(Budget(max_steps=1), n_stages=1, tokens_per_step=100)  # lora/full: one stage


def test_a_time_budget_shrinks_the_remaining_steps_from_the_measured_speed():
    plan = plan_stages(CITI, [1, 3, 1], [100, 300, 100], Budget(max_seconds=60), tokens_per_step=100)
    # 3 steps done in stage 1 at 0.5 s each, 10 s into the job, 40 s left before the deadline: 80 more steps.
    plan.fit_to_time(stage_index=0, steps_done_in_stage=3, seconds_per_step=0.5, now_s=10, deadline_s=50)
    assert plan.time_fitted and plan.total_steps == 83 and plan.steps[1] > plan.steps[0]
    assert plan.time_limits[-1] == pytest.approx(50)
    again = StagePlan.from_dict(plan.to_dict())  # what a checkpoint stores
    assert again == plan


def test_budget_fields_refuse_nonsense():
    with pytest.raises(ValueError, match="must be a whole number from 1 to"):
        Budget(max_tokens=0)
    with pytest.raises(ValueError, match="whole number"):
        Budget(max_steps=2.5)
    with pytest.raises(ValueError, match="must be a number"):
        Budget(max_seconds="soon")


@pytest.mark.parametrize(("field", "value"), [("max_steps", 1e30), ("max_steps", 2**63), ("max_tokens", 10**13),
                                              ("max_seconds", float("inf")), ("max_seconds", float("nan")),
                                              ("max_seconds", 1e9)])
def test_budgets_are_finite_and_bounded(field, value):
    with pytest.raises(ValueError, match=f"budget.{field} must be"):
        Budget(**{field: value})
    assert Budget(max_steps=1e6).max_steps == 1_000_000  # a whole float from JSON is a whole number


@pytest.mark.parametrize("total", [10**7, 2**63, 10**30])
def test_huge_totals_split_exactly_and_at_once(total):
    start = time.monotonic()
    parts = split_in_proportion(total, [1.0, 3.0, 1.0])
    assert sum(parts) == total and min(parts) >= 1
    assert abs(parts[1] - 3 * total // 5) <= 1
    assert time.monotonic() - start < 0.1


# ------------------------------------------------------------------------------------------ real runs


@pytest.fixture()
def unloadable_model(tiny_model, tmp_path) -> str:  # noqa: F811
    """The tiny model's tokenizer and config without its weights: loading the model itself fails."""
    import shutil

    target = tmp_path / "no-weights"
    shutil.copytree(tiny_model, target)
    for weights in target.glob("*.safetensors"):
        weights.unlink()
    return str(target)


@pytest.mark.parametrize("budget", [{"max_steps": 2}, {"max_tokens": 50}])
def test_too_small_budget_is_refused_before_the_model_is_loaded(unloadable_model, tmp_path, budget):
    data = write_data(tmp_path)
    events = []
    with pytest.raises(BudgetError, match="too small"):
        finetune_cfg = small_config(unloadable_model, data, tmp_path / "out", budget=budget)
        from citi_engine.train import finetune

        finetune(finetune_cfg, on_event=events.append)
    assert "loading" not in [e["stage"] for e in events]  # the (weightless) model was never touched


def test_max_steps_stops_the_run(tiny_model, tmp_path):  # noqa: F811
    from citi_engine.train import finetune

    result = finetune(small_config(tiny_model, write_data(tmp_path), tmp_path / "out", budget={"max_steps": 5}))
    assert result.steps == 5 and result.stage_steps == {"router_pretraining": 1, "molora": 3, "uco": 1}


def test_max_tokens_stops_the_run(tiny_model, tmp_path):  # noqa: F811
    from citi_engine.train import finetune

    events = []
    cfg = small_config(tiny_model, write_data(tmp_path), tmp_path / "out", method="lora",
                       budget={"max_tokens": 1500})
    result = finetune(cfg, on_event=events.append)
    natural = 2 * 16 / 2  # 2 epochs of 16 tool examples, 2 a step (lora trains on tool data only)
    assert 1 <= result.steps < natural
    assert result.trained_tokens <= 1500
    steps = [e for e in events if e["type"] == "progress" and e["stage"] == "train"]
    assert len(steps) == result.steps


def test_max_seconds_stops_the_run_and_counts_the_whole_job(tiny_model, tmp_path):  # noqa: F811
    from citi_engine.train import finetune

    events = []
    cfg = small_config(tiny_model, write_data(tmp_path), tmp_path / "out", method="lora",
                       budget={"max_seconds": 20}, hyperparameters={"epochs_train": 1000})
    started = time.monotonic()
    result = finetune(cfg, on_event=events.append)
    elapsed = time.monotonic() - started
    assert result.steps < 1000 * 16 / 2
    assert any("time budget" in e["message"] for e in events)
    assert elapsed < 20 + 10  # the deadline, plus one step and saving on a busy machine
    assert Path(result.adapter_dir, "adapter_model.safetensors").is_file()
