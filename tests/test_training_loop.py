"""The shared training loop (:func:`trainer.training.run_training`) on its own, with a fake
recipe: a three-number model pulled towards per-batch targets by plain SGD, in two phases
like STIR's (``w`` alone, then ``w`` and ``b``), so every outcome is exact and cheap."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import trainer.loop as loop_module
from trainer.loop import CALIBRATION_STEPS, Budget, TrainResult, Validate
from trainer.training import Recipe, StepLoss, run_training

PER_EPOCH = 3
SWITCH_AT = 4
"""The step at which the fake recipe's second phase (its own optimizer) starts."""


class Pull(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(1))


class FakeRecipe(Recipe):
    name = "fake"

    def __init__(self) -> None:
        self.pull = Pull()
        self.net = self.pull  # the loop's view: any module
        self.phase = "first"
        self._optimizer: torch.optim.Optimizer | None = None
        self.visits: list[tuple[int, int, int]] = []
        """(step, epoch, batch number) of every step this process ran."""
        self.started_with: Mapping[str, Any] | None = None
        self.calibrations: list[list[float]] = []
        self.finished_with: list[Mapping[str, Any] | None] = []
        self.cost = 1.0

    def _optimizer_for(self, phase: str) -> torch.optim.Optimizer:
        # Two parameter groups in the second phase: a saved second-phase optimizer state
        # does not load into a first-phase optimizer.
        if phase == "first":
            return torch.optim.SGD([self.pull.w], lr=0.1)
        return torch.optim.SGD([{"params": [self.pull.w]}, {"params": [self.pull.b]}], lr=0.05)

    @property
    def steps_per_epoch(self) -> int:
        return PER_EPOCH

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        for number in range(PER_EPOCH):
            yield np.array([epoch, number])

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        assert self._optimizer is not None
        return self._optimizer

    def start(self, saved: Mapping[str, Any] | None) -> None:
        self.started_with = saved
        if saved is not None:
            self.phase = saved["phase"]
        self.pull.b.requires_grad_(self.phase == "second")
        self._optimizer = self._optimizer_for(self.phase)

    def progress_fields(self) -> dict[str, Any]:
        return {"phase": self.phase}

    def step_loss(self, step: int, planned: int, batch: np.ndarray) -> StepLoss:
        if self.phase == "first" and step >= SWITCH_AT:
            self.phase = "second"
            self.pull.b.requires_grad_(True)
            self._optimizer = self._optimizer_for("second")
        epoch, number = int(batch[0]), int(batch[1])
        self.visits.append((step, epoch, number))
        target = torch.tensor([1.0 + number, -1.0 - epoch % 2])
        loss = ((self.pull.w - target) ** 2).sum() + ((self.pull.b - 0.5 * number) ** 2).sum()
        return StepLoss(loss, {"number": float(number)})

    def epoch_fields(self) -> dict[str, Any]:
        return {"phase": self.phase}

    def later_steps_cost(self, step_times: list[float]) -> float:
        self.calibrations.append(list(step_times))
        return self.cost

    def finish(self, best_entry: Mapping[str, Any] | None) -> None:
        self.finished_with.append(best_entry)


@dataclass(frozen=True)
class StepBudget(Budget):
    """Runs out once ``recipe`` has run ``limit`` steps in this process, whatever the
    clock; records the reserve each check asked for."""

    recipe: FakeRecipe | None = None
    limit: int = 0
    reserves: list[float] = field(default_factory=list)

    def expired(self, reserve: float = 0.0) -> bool:
        assert self.recipe is not None
        self.reserves.append(reserve)
        return len(self.recipe.visits) >= self.limit


def train(
    recipe: FakeRecipe,
    *,
    planned: int = 9,
    validate: Validate | None = None,
    budget: Budget | None = None,
    state_path: Path | None = None,
    log: list[str] | None = None,
) -> TrainResult:
    lines = log if log is not None else []
    return run_training(
        recipe,
        planned=planned,
        select_metric="score",
        validate=validate,
        budget=budget or Budget(),
        state_path=state_path,
        device=torch.device("cpu"),
        dtype=None,
        log=lines.append,
        progress=False,
        started=time.monotonic(),
    )


def weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def scripted_validation(scores: list[float], seen: list[dict[str, torch.Tensor]]) -> Validate:
    """Returns ``scores`` in turn and records the weights it was shown."""

    def validate(model: nn.Module) -> dict[str, float]:
        assert not model.training
        seen.append(weights(model))
        return {"score": scores[len(seen) - 1]}

    return validate


def test_a_resumed_run_continues_at_the_saved_step_and_batch(tmp_path: Path) -> None:
    reference = FakeRecipe()
    whole = train(reference)
    assert whole.steps_done == 9 and reference.visits[0] == (0, 0, 0)

    state = tmp_path / "state.safetensors"
    first = FakeRecipe()
    # Stops after 5 steps: epoch 0 whole, epoch 1's batches 0 and 1, in the second phase.
    stopped = train(first, budget=StepBudget(recipe=first, limit=5), state_path=state)
    assert (stopped.steps_done, stopped.stopped_by) == (5, "time")
    progress = json.loads(state.with_suffix(".json").read_text())["progress"]
    assert (progress["step"], progress["epoch"], progress["skip"]) == (5, 1, 2)
    assert progress["phase"] == "second"  # the recipe's own field travels with the state

    second = FakeRecipe()
    lines: list[str] = []
    resumed = train(second, state_path=state, log=lines)
    assert second.started_with is not None and second.started_with["phase"] == "second"
    assert lines[0] == "fake: resumed at step 5/9 (epoch 2)"
    assert second.visits[0] == (5, 1, 2)  # the saved step, at the saved batch
    assert first.visits + second.visits == reference.visits
    assert resumed.steps_done == 9 and resumed.epochs_done == whole.epochs_done == 3
    for key, value in weights(reference.net).items():
        assert torch.equal(weights(second.net)[key], value), key
    # the state's optimizer was restored into the phase's own optimizer (two groups)
    assert len(second.optimizer.param_groups) == 2


def test_a_budget_stops_stepping_and_still_validates_the_last_steps() -> None:
    recipe = FakeRecipe()
    seen: list[dict[str, torch.Tensor]] = []
    budget = StepBudget(recipe=recipe, limit=4)
    result = train(recipe, validate=scripted_validation([0.1, 0.2, 0.3], seen), budget=budget)
    assert (result.steps_done, result.planned_steps, result.stopped_by) == (4, 9, "time")
    # the start, epoch 0 (steps 1-3), and the one step of epoch 1 run before the budget ended
    assert [e["step"] for e in result.history] == [0, 3, 4]
    assert len(seen) == 3 and "score" in result.history[-1]
    # the last validation saw the last step's weights (and, scoring best, they are kept)
    assert not torch.equal(seen[-1]["w"], seen[-2]["w"])
    assert result.best_epoch == 2 and torch.equal(seen[-1]["w"], weights(recipe.net)["w"])
    # stepping kept the time of the latest validation in reserve, never more or less
    val_seconds = [e["val_seconds"] for e in result.history]
    assert budget.reserves and set(budget.reserves) <= set(val_seconds)
    assert budget.reserves[-1] == val_seconds[-1]

    unvalidated = FakeRecipe()
    quiet = StepBudget(recipe=unvalidated, limit=4)
    result = train(unvalidated, budget=quiet)
    assert result.steps_done == 4 and set(quiet.reserves) == {0.0}


def test_the_best_epochs_weights_are_restored() -> None:
    recipe = FakeRecipe()
    seen: list[dict[str, torch.Tensor]] = []
    lines: list[str] = []
    result = train(recipe, validate=scripted_validation([0.1, 0.5, 0.9, 0.3], seen), log=lines)
    assert (result.best_epoch, result.best_metric) == (2, 0.9)
    assert len(seen) == 4
    assert torch.equal(weights(recipe.net)["w"], seen[2]["w"])
    assert not torch.equal(seen[2]["w"], seen[3]["w"])  # the last epoch did move them
    assert recipe.finished_with == [result.history[2]] and result.history[2]["epoch"] == 2
    assert not recipe.net.training
    assert lines[0] == "fake: start weights score 0.1000"
    # the epoch's entry: step stats averaged over it, then the recipe's fields
    entry = result.history[2]
    assert list(entry) == ["epoch", "step", "loss", "number", "phase", "lr", "score"] + [
        "val_seconds"
    ]
    assert (entry["number"], entry["phase"], entry["lr"]) == (1.0, "second", 0.05)
    assert (
        lines[2]
        == f"fake epoch 2 (step 6), loss {entry['loss']:.4f}, second, lr 5.00e-02, val score 0.9000"
    )


def test_a_run_that_never_beats_its_start_weights_returns_them() -> None:
    recipe = FakeRecipe()
    start = weights(recipe.net)
    seen: list[dict[str, torch.Tensor]] = []
    result = train(recipe, validate=scripted_validation([0.7, 0.6, 0.7, 0.5], seen))
    assert (result.best_epoch, result.best_metric, result.steps_done) == (0, 0.7, 9)
    assert not torch.equal(seen[-1]["w"], start["w"])  # training moved the weights
    for key, value in start.items():
        assert torch.equal(weights(recipe.net)[key], value), key
    assert recipe.finished_with == [result.history[0]]


def test_without_validation_the_last_weights_are_kept() -> None:
    recipe = FakeRecipe()
    result = train(recipe)
    reference = FakeRecipe()
    seen: list[dict[str, torch.Tensor]] = []
    train(reference, validate=scripted_validation([0.0, 0.0, 0.0, 1.0], seen))
    assert np.isnan(result.best_metric) and result.best_epoch == result.epochs_done == 3
    assert recipe.finished_with == [None]
    assert torch.equal(weights(recipe.net)["w"], seen[-1]["w"])


@dataclass(frozen=True)
class FixedBudget(Budget):
    """A budget with ``seconds`` left for good: planning sees it, stepping never ends it."""

    seconds: float = 0.0

    def remaining(self) -> float:
        return self.seconds

    def expired(self, reserve: float = 0.0) -> bool:
        return False


def test_calibration_plans_with_the_recipes_cost_of_later_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every timed step costs 0.1 s: 10 s then afford 100 steps at cost 1, 50 at cost 2
    monkeypatch.setattr(loop_module, "calibrated_step_seconds", lambda times: 0.1)
    recipe = FakeRecipe()
    recipe.cost = 2.0
    lines: list[str] = []
    result = train(recipe, planned=1000, budget=FixedBudget(deadline=0.0, seconds=10.0), log=lines)
    assert len(recipe.calibrations) == 1 and len(recipe.calibrations[0]) == CALIBRATION_STEPS
    assert result.planned_steps == result.steps_done == CALIBRATION_STEPS + 50
    assert result.stopped_by == "steps"
    assert "fake: 70 steps fit the time budget" in lines

    unbudgeted = FakeRecipe()
    result = train(unbudgeted, planned=30)
    assert unbudgeted.calibrations == [] and result.planned_steps == 30
