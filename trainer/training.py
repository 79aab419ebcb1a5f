"""The training loop, written once; the embedder and the STIR train through it as recipes.

The loop owns what makes a run a run: the step plan (fixed by a time budget after the
calibration steps, :mod:`trainer.loop`), a validation after every epoch that keeps the
best weights (the start weights count too: a run that never beats them returns them), a
resumable state after every epoch (:mod:`trainer.state`; a resumed run skips to the batch
it stopped at), the progress bar, the per-epoch log lines and the end-to-end step timing.

A :class:`Recipe` is what differs between models: its batches, its loss on a batch (with
the learning rate and phase of that step), its optimizer, and a few hooks with defaults.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from searchsvc.core.progress import bar_disabled
from searchsvc.models.runtime import pixels_to_tensor
from trainer.augment import random_resized_crop
from trainer.loop import (
    CALIBRATION_STEPS,
    Budget,
    Log,
    TrainResult,
    Validate,
    epoch_line,
    replan_after_calibration,
    run_validation,
    snapshot,
)
from trainer.state import load_state, save_state, saved_progress


@dataclass(frozen=True)
class StepLoss:
    """What a recipe computed for one step, before the loop's optimiser step."""

    loss: torch.Tensor
    """The scalar to minimise."""
    stats: Mapping[str, torch.Tensor | float] = field(default_factory=dict)
    """Per-step figures averaged into the epoch's history entry (``active_triplets``,
    ``pair_accuracy``). A tensor is read after the optimiser step, not before, so that
    the step is not held up waiting for it."""


class Recipe(ABC):
    """The model-specific part of a training run. The loop calls, per run:
    :meth:`start`, then per step :meth:`step_loss` (and the optimiser step on
    :attr:`optimizer`), per epoch :meth:`epoch_fields` and :meth:`after_epoch_validation`,
    and at the end :meth:`stepping_ended` and :meth:`finish`."""

    name: ClassVar[str]
    """Names the run in log lines, on the progress bar: ``embedder``, ``stir``."""
    net: nn.Module
    """The network trained in place; on return it holds the best weights, in eval mode."""

    @property
    @abstractmethod
    def steps_per_epoch(self) -> int:
        """How many batches :meth:`batches` yields (what a budgeted plan divides by)."""

    @abstractmethod
    def batches(self, epoch: int) -> Iterable[np.ndarray]:
        """The batches (item indices) of ``epoch``; the same ones on every call, so that a
        resumed run skips the ones it has done."""

    @property
    @abstractmethod
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of the current step; read again at every step and every save (a
        recipe may switch optimizers between steps: STIR's phases)."""

    @abstractmethod
    def step_loss(self, step: int, planned: int, batch: np.ndarray) -> StepLoss:
        """Set up step ``step`` of ``planned`` (learning rate, phase) and compute its loss
        on ``batch``. Seed any randomness by ``step``: a resumed run must repeat it."""

    def start(self, saved: Mapping[str, Any] | None) -> None:  # noqa: B027 (an optional hook)
        """Called once before the run's state is restored (``saved``: its progress, with
        the :meth:`progress_fields`) or the start weights validated (``saved`` None): a
        recipe whose optimizer depends on the progress (STIR's phase) builds it here, so
        that the saved optimizer state is restored into the right one."""

    def progress_fields(self) -> dict[str, Any]:
        """Recipe state saved with the progress after every epoch (given back to
        :meth:`start` on resume)."""
        return {}

    def epoch_fields(self) -> dict[str, Any]:
        """Fields of the epoch's history entry after the averaged step stats (``mining``,
        ``phase``)."""
        return {}

    def resume_note(self, epoch: int) -> str:
        """Where a resumed run picks up, for its log line."""
        return f"epoch {epoch + 1}"

    def after_epoch_validation(self) -> None:  # noqa: B027 (an optional hook)
        """Called after each epoch's validation, which put the net back in training mode
        (STIR re-freezes its backbone's modules). Not after the start validation: the
        loops this one replaced did not re-freeze there, and a run must stay the same run
        (so a validated STIR's first head epoch runs its frozen backbone's modules, e.g. a
        conv stem's BatchNorm, in training mode)."""

    def later_steps_cost(self, step_times: list[float]) -> float:
        """Called once, when the calibration steps were timed under a budget: the average
        step of the whole plan over a timed one (STIR's timed steps train its head alone)."""
        return 1.0

    def stepping_ended(self, step: int) -> None:  # noqa: B027 (an optional hook)
        """Called when stepping stops, the net still holding its last weights."""

    def finish(self, best_entry: Mapping[str, Any] | None) -> None:  # noqa: B027 (optional)
        """Called at the end of a run, the net holding its best weights (``best_entry``:
        their history entry; None without validation)."""


@dataclass
class RunProgress:
    """Where a run stands; saved after every epoch, restored on resume."""

    planned: int
    step: int = 0
    epoch: int = 0
    skip: int = 0
    """Batches of ``epoch`` already done (a run stopped mid-epoch resumes after them)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float = -1.0
    best_epoch: int = 0
    val_seconds: float = 0.0
    """The last validation's duration: the time stepping leaves for the next one."""

    def saved(self, recipe_fields: Mapping[str, Any]) -> dict[str, Any]:
        """The progress as the state file holds it (this key order: the format predates
        this class)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "skip": self.skip,
            "planned": self.planned,
            **recipe_fields,
            "history": self.history,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "val_seconds": self.val_seconds,
        }

    @classmethod
    def restore(cls, saved: Mapping[str, Any]) -> RunProgress:
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


def run_training(
    recipe: Recipe,
    *,
    planned: int,
    select_metric: str,
    validate: Validate | None,
    budget: Budget,
    state_path: Path | None,
    device: torch.device,
    dtype: torch.dtype | None,
    log: Log,
    progress: bool,
    started: float,
) -> TrainResult:
    """Train ``recipe.net`` in place for ``planned`` steps (fewer when ``budget`` runs out)
    and return what the run did; the net ends with its best weights (by ``select_metric``
    of ``validate``), in eval mode. With ``state_path`` the run resumes from, and keeps
    saving, that state. ``dtype``: the autocast type (float16 scales the gradients).
    ``started``: when the caller's run began (``time.monotonic()``), for its seconds."""
    net, name = recipe.net, recipe.name
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    run = RunProgress(planned=planned)
    best: dict[str, torch.Tensor] | None = None
    resuming = state_path is not None and state_path.is_file()
    recipe.start(saved_progress(state_path) if state_path is not None and resuming else None)
    if state_path is not None and resuming:
        best, saved = load_state(state_path, model=net, optimizer=recipe.optimizer)
        run = RunProgress.restore(saved)
        log(f"{name}: resumed at step {run.step}/{run.planned} ({recipe.resume_note(run.epoch)})")
    elif validate is not None:
        metrics, run.val_seconds = run_validation(net, validate)
        run.best_metric, best = metrics[select_metric], snapshot(net)
        run.history.append({"epoch": 0, "step": 0, **metrics, "val_seconds": run.val_seconds})
        log(f"{name}: start weights {select_metric} {run.best_metric:.4f}")

    def out_of_time() -> bool:
        # Stepping stops while the last validation still fits in the budget.
        return budget.expired(run.val_seconds if validate is not None else 0.0)

    bar = tqdm(
        total=run.planned, initial=run.step, desc=name, unit="step", disable=bar_disabled(progress)
    )
    # A step's time is measured end to end (from the previous step's end), so that what
    # happens between steps (a new epoch's batches, its log line) is planned for too.
    step_times: list[float] = []
    last_end = time.monotonic()
    try:
        while run.step < run.planned and not out_of_time():
            losses: list[float] = []
            stats: dict[str, list[float]] = {}
            stopped_at: int | None = None
            for batch_no, batch in enumerate(recipe.batches(run.epoch)):
                if batch_no < run.skip:
                    continue
                if run.step >= run.planned or out_of_time():
                    stopped_at = batch_no
                    break
                computed = recipe.step_loss(run.step, run.planned, batch)
                optimizer = recipe.optimizer
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(computed.loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(computed.loss.detach()))
                for key, value in computed.stats.items():
                    stats.setdefault(key, []).append(float(value))
                run.step += 1
                bar.update(1)
                now = time.monotonic()
                step_times.append(now - last_end)
                last_end = now
                calibrated = len(step_times) == CALIBRATION_STEPS and budget.deadline is not None
                run.planned = replan_after_calibration(
                    step_times,
                    run.planned,
                    run.step,
                    validation_seconds=run.val_seconds,
                    steps_per_epoch=recipe.steps_per_epoch,
                    budget=budget,
                    bar=bar,
                    log=log,
                    name=name,
                    later_steps_cost=recipe.later_steps_cost(step_times) if calibrated else 1.0,
                )
            if losses:
                entry: dict[str, Any] = {
                    "epoch": run.epoch + 1,
                    "step": run.step,
                    "loss": float(np.mean(losses)),
                    **{key: float(np.mean(values)) for key, values in stats.items()},
                    **recipe.epoch_fields(),
                    "lr": recipe.optimizer.param_groups[0]["lr"],
                }
                if validate is not None:
                    metrics, run.val_seconds = run_validation(net, validate)
                    recipe.after_epoch_validation()
                    entry.update(metrics, val_seconds=run.val_seconds)
                    if metrics[select_metric] > run.best_metric:
                        run.best_metric, run.best_epoch = metrics[select_metric], run.epoch + 1
                        best = snapshot(net)
                run.history.append(entry)
                log(epoch_line(name, entry, select_metric))
            if stopped_at is None:
                run.epoch, run.skip = run.epoch + 1, 0
            else:
                run.skip = stopped_at  # a resumed run continues this epoch at this batch
            if state_path is not None:
                save_state(
                    state_path,
                    model=net,
                    optimizer=recipe.optimizer,
                    best=best,
                    progress=run.saved(recipe.progress_fields()),
                )
        recipe.stepping_ended(run.step)
    finally:
        bar.close()
    stopped_by = "steps" if run.step >= run.planned else "time"
    best_entry: dict[str, Any] | None = None
    if best is not None:
        net.load_state_dict(best)
        # NOTE: a run stopped mid-epoch and resumed has two entries for that epoch; this
        # takes the first, which need not be the one that scored best_metric.
        best_entry = next(e for e in run.history if e["epoch"] == run.best_epoch)
        best_metric, best_epoch = run.best_metric, run.best_epoch
    else:
        best_metric, best_epoch = float("nan"), run.epoch
    recipe.finish(best_entry)
    net.eval()
    return TrainResult(
        best_metric=best_metric,
        best_epoch=best_epoch,
        steps_done=run.step,
        planned_steps=run.planned,
        epochs_done=run.epoch,
        stopped_by=stopped_by,
        seconds=time.monotonic() - started,
        history=run.history,
    )


def seeded_views(
    pixels: np.ndarray,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    size: int,
    crop_scale: tuple[float, float],
    device: torch.device,
    seed: int,
    step: int,
) -> torch.Tensor:
    """A step's augmented views of ``pixels`` (``(N, L, L, 3)`` uint8): normalised by
    ``mean`` and ``std``, cropped to ``size``. Seeded by the step: the crops by their own
    generator, and the global torch seed too, for the step's dropout, so that a resumed
    run repeats the step exactly."""
    images = pixels_to_tensor(pixels, mean, std, device)
    torch.manual_seed(seed * 1_000_003 + step)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return random_resized_crop(images, size, scale=crop_scale, generator=generator)
