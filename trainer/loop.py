"""The time budget, the step plan, the lr schedule (for the loop, :mod:`trainer.training`).

A run is planned in optimisation STEPS, so its schedule (warm-up, cosine decay, the
all-triplets phase, the pair curriculum, the frozen phase) is a function of the step
number alone and a run with the same data, seed and step count is the same run. A time
budget only decides the step count: after a few measured steps the plan is cut to what
fits, and the count is recorded (pass it as ``steps`` to repeat the run exactly).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from searchsvc.core.profiles import EmbedderSpec

Log = Callable[[str], None]
Validate = Callable[[torch.nn.Module], dict[str, float]]
"""Called with the network in eval mode; returns validation metrics (``cmc@1`` ...)."""


def stderr_log(message: str) -> None:
    """Per-epoch lines on stderr, above any progress bar."""
    tqdm.write(message, file=sys.stderr)


CALIBRATION_STEPS = 20
"""Steps run before a budget fixes the plan. Nothing in these steps depends on the plan
(lr warm-up then held at its peak, all triplets, random pairs, frozen backbone), so a
budgeted run and its repetition with ``steps=N`` are the same run."""
UNTIMED_STEPS = 10
"""The first calibration steps are not timed: a fresh process runs its first ~10 training
steps 2-4x slower than the rest (allocator and kernel warm-up; measured on the small
profile in bf16: 969, 835, 621, ... 648 ms, then 220-260). Planning with the first three
left 99 s of a 14-minute class-level budget unused."""


@dataclass(frozen=True)
class Budget:
    """A wall-clock deadline (``time.monotonic()``), or none."""

    deadline: float | None = None

    @classmethod
    def of_seconds(cls, seconds: float | None) -> Budget:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def expired(self, reserve: float = 0.0) -> bool:
        """True once less than ``reserve`` seconds are left (the time a last validation
        needs, so that it runs inside the budget, not after it)."""
        return self.remaining() <= reserve


def plan_steps(
    planned: int,
    done: int,
    *,
    seconds_per_step: float,
    validation_seconds: float,
    steps_per_epoch: int,
    budget: Budget,
) -> int:
    """The step count that fits the budget (never more than ``planned``, never fewer than
    ``done``): each step costs ``seconds_per_step`` plus its share of one validation per
    epoch."""
    remaining = budget.remaining()
    if math.isinf(remaining):
        return planned
    per_step = seconds_per_step + validation_seconds / max(1, steps_per_epoch)
    affordable = done + int(max(0.0, remaining - validation_seconds) / max(per_step, 1e-9))
    return max(done, min(planned, affordable))


def replan_after_calibration(
    step_times: list[float],
    planned: int,
    done: int,
    *,
    validation_seconds: float,
    steps_per_epoch: int,
    budget: Budget,
    bar: Any,
    log: Log,
    name: str,
    later_steps_cost: float = 1.0,
) -> int:
    """Once ``CALIBRATION_STEPS`` steps are timed under a budget, fix the step count the
    budget affords (see :func:`plan_steps`) and show it; otherwise keep ``planned``.

    ``later_steps_cost``: the average step of the whole plan over a timed one (STIR's timed
    steps train the head alone; the full steps that follow cost more)."""
    if len(step_times) != CALIBRATION_STEPS or budget.deadline is None:
        return planned
    timed = calibrated_step_seconds(step_times)
    planned = plan_steps(
        planned,
        done,
        seconds_per_step=timed * later_steps_cost,
        validation_seconds=validation_seconds,
        steps_per_epoch=steps_per_epoch,
        budget=budget,
    )
    bar.total = planned
    bar.refresh()
    log(f"{name}: {planned} steps fit the time budget")
    return planned


def calibrated_step_seconds(step_times: list[float]) -> float:
    """The cost of a step, from the calibration steps after the untimed warm-up: their
    median (one slow step, a late kernel build or a page fault, must not halve a plan)."""
    timed = step_times[UNTIMED_STEPS:CALIBRATION_STEPS] or step_times[-1:]
    return float(np.median(timed))


def lr_factor(step: int, *, warmup: int, total: int, floor: float = 0.01, hold: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, the peak held until step ``hold``, then cosine
    decay to ``floor`` at ``total``. (Holding through the calibration steps keeps them
    independent of the plan they fix.)"""
    if step < warmup:
        return (step + 1) / warmup
    start = max(warmup, hold)
    if step < start:
        return 1.0
    span = max(1, total - start)
    progress = min(1.0, (step - start) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    """What a training run did; ``history`` has one entry per epoch (epoch 0: the start)."""

    best_metric: float
    best_epoch: int
    steps_done: int
    planned_steps: int
    epochs_done: int
    stopped_by: str
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


def run_validation(net: torch.nn.Module, validate: Validate) -> tuple[dict[str, float], float]:
    tick = time.monotonic()
    was_training = net.training
    net.eval()
    try:
        metrics = validate(net)
    finally:
        net.train(was_training)
    return {k: float(v) for k, v in metrics.items()}, time.monotonic() - tick


def epoch_line(name: str, entry: dict[str, Any], metric: str) -> str:
    parts = [f"{name} epoch {entry['epoch']} (step {entry['step']})"]
    if entry.get("loss") is not None:
        parts.append(f"loss {entry['loss']:.4f}")
    for key in ("active_triplets", "pair_accuracy"):
        if entry.get(key) is not None:
            parts.append(f"{key.replace('_', ' ')} {entry[key]:.2f}")
    for key in ("mining", "phase"):
        if entry.get(key):
            parts.append(str(entry[key]))
    parts.append(f"lr {entry['lr']:.2e}")
    if metric in entry:
        parts.append(f"val {metric} {entry[metric]:.4f}")
    if entry.get("fusion_weight") is not None:
        parts.append(f"fusion weight {entry['fusion_weight']:g}")
    if entry.get("symmetric"):
        parts.append("symmetric")
    return ", ".join(parts)


def fine_tuning(spec: EmbedderSpec) -> bool:
    """True for an architecture that starts from pretrained weights (it asks for the hub's
    weights, or its timm name carries a pretrained tag such as ``.dino``): it is fine-tuned
    at the reference's low rates. Decided from the architecture, not from the file's
    ``hub_pretrained`` flag, which loading clears."""
    return spec.hub_pretrained or "." in spec.timm_name
