"""Training the first-stage embedder: triplet loss on L2-normalised embeddings.

Recipe (STIR.md, reference pipeline), with the lessons of the feasibility runs:

- balanced batches of ``n_labels x n_instances`` (:mod:`trainer.samplers`);
- RandomResizedCrop (scale 0.2-1.0, bicubic) + horizontal flip (:mod:`trainer.augment`),
  cut from pixels decoded a little larger than the model's input;
- triplet loss, margin 0.15, all valid triplets for the first 30% of the steps, then the
  hardest per anchor (pure hardest-in-batch collapsed; the embedder's BatchNorm before the
  L2 norm is the other half of that fix);
- AdamW, linear warm-up then cosine decay; autocast on CUDA (a GradScaler for fp16);
- model selection by validation CMC@1 after every epoch (the start weights count too: a
  run that never beats them returns them, and the gate then refuses it);
- a resumable state after every epoch (:mod:`trainer.state`).

The function takes arrays, not the DB: a benchmark can call it with its own data.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from searchsvc.core.profiles import EmbedderSpec
from searchsvc.models.embedder import EmbeddingNet
from searchsvc.models.runtime import (
    Precision,
    pixels_to_tensor,
    select_device,
    training_autocast_dtype,
    training_forward,
)
from trainer.augment import random_resized_crop
from trainer.data import TrainSet
from trainer.loop import (
    CALIBRATION_STEPS,
    Budget,
    Log,
    TrainResult,
    Validate,
    epoch_line,
    fine_tuning,
    lr_factor,
    replan_after_calibration,
    run_validation,
    snapshot,
    stderr_log,
)
from trainer.losses import triplet_loss
from trainer.samplers import BalancedBatchSampler
from trainer.state import load_state, save_state


@dataclass(frozen=True)
class EmbedderTrainConfig:
    epochs: int = 30
    steps: int | None = None
    """Exact number of optimisation steps (overrides ``epochs``); a recorded run's
    ``planned_steps`` repeats it."""
    lr: float | None = None
    """None: 1e-5 when fine-tuning a pretrained architecture (the reference recipe, see
    :func:`trainer.loop.fine_tuning`), 1e-3 for one trained from scratch."""
    weight_decay: float = 0.05
    margin: float = 0.15
    n_labels: int = 32
    n_instances: int = 4
    all_triplets_fraction: float = 0.3
    crop_scale: tuple[float, float] | None = None
    """RandomResizedCrop area range. None: (0.2, 1.0) when fine-tuning (the reference),
    (0.8, 1.0) from scratch. Measured on the demo catalog (small profile from scratch, 150
    steps, validation CMC@1): crop 0.2-1.0 with lr 5e-4: 40.3; crop 0.8-1.0: 51.2; lr
    1e-3: 44.3; both (these defaults): 60.7. Small 32 px photos lose the product in a 20%
    crop."""
    warmup_steps: int = 10
    select_metric: str = "cmc@1"
    seed: int = 0
    device: str = "auto"
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError("epochs and steps must be positive")
        if not 0.0 <= self.all_triplets_fraction <= 1.0:
            raise ValueError("all_triplets_fraction must be in [0, 1]")
        if self.margin <= 0:
            raise ValueError(f"margin must be positive, got {self.margin}")

    def resolve(self, spec: EmbedderSpec) -> EmbedderTrainConfig:
        """The config with every default decided for this architecture (what is recorded)."""
        tuned = fine_tuning(spec)
        return replace(
            self,
            lr=self.lr if self.lr is not None else (1e-5 if tuned else 1e-3),
            crop_scale=self.crop_scale or ((0.2, 1.0) if tuned else (0.8, 1.0)),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def train_embedder(
    net: EmbeddingNet,
    data: TrainSet,
    config: EmbedderTrainConfig,
    *,
    validate: Validate | None = None,
    budget: Budget | None = None,
    state_path: Path | None = None,
    log: Log = stderr_log,
    progress: bool = True,
) -> TrainResult:
    """Train ``net`` in place; on return it holds the best weights (by validation), in
    eval mode. With ``state_path`` the run resumes from (and keeps saving) that state."""
    started = time.monotonic()
    config = config.resolve(net.spec)
    assert config.lr is not None and config.crop_scale is not None
    budget = budget or Budget()
    device = select_device(config.device)
    dtype = training_autocast_dtype(device, config.precision)
    net.to(device).train()
    sampler = BalancedBatchSampler(data.labels, config.n_labels, config.n_instances, config.seed)
    per_epoch = len(sampler)
    planned = config.steps or config.epochs * per_epoch
    lr = config.lr
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    size = net.spec.input_size

    step, epoch, skip = 0, 0, 0
    history: list[dict[str, Any]] = []
    best: dict[str, torch.Tensor] | None = None
    best_metric, best_epoch, val_seconds = -1.0, 0, 0.0
    if state_path is not None and state_path.is_file():
        best, progress_state = load_state(state_path, model=net, optimizer=optimizer)
        step, epoch, skip = progress_state["step"], progress_state["epoch"], progress_state["skip"]
        planned, history = progress_state["planned"], progress_state["history"]
        best_metric, best_epoch = progress_state["best_metric"], progress_state["best_epoch"]
        val_seconds = progress_state["val_seconds"]
        log(f"embedder: resumed at step {step}/{planned} (epoch {epoch + 1})")
    elif validate is not None:
        metrics, val_seconds = run_validation(net, validate)
        best_metric, best = metrics[config.select_metric], snapshot(net)
        history.append({"epoch": 0, "step": 0, **metrics, "val_seconds": val_seconds})
        log(f"embedder: start weights {config.select_metric} {best_metric:.4f}")

    def save(at_epoch: int, skip_batches: int) -> None:
        if state_path is not None:
            save_state(
                state_path,
                model=net,
                optimizer=optimizer,
                best=best,
                progress={
                    "step": step,
                    "epoch": at_epoch,
                    "skip": skip_batches,
                    "planned": planned,
                    "history": history,
                    "best_metric": best_metric,
                    "best_epoch": best_epoch,
                    "val_seconds": val_seconds,
                },
            )

    bar = tqdm(total=planned, initial=step, desc="embedder", unit="step", disable=not progress)
    # A step's time is measured end to end (from the previous step's end), so that what
    # happens between steps (a new sampler epoch, its log line) is planned for too.
    step_times: list[float] = []
    last_end = time.monotonic()
    try:
        # Stepping stops while the last validation still fits in the budget.
        while step < planned and not budget.expired(val_seconds if validate else 0.0):
            losses, actives, mining = [], [], "all"
            stopped_at: int | None = None
            for batch_no, batch in enumerate(sampler.epoch(epoch)):
                if batch_no < skip:
                    continue
                if step >= planned or budget.expired(val_seconds if validate else 0.0):
                    stopped_at = batch_no
                    break
                all_phase = max(CALIBRATION_STEPS, config.all_triplets_fraction * planned)
                mining = "all" if step < all_phase else "hardest"
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(
                        step, warmup=config.warmup_steps, total=planned, hold=CALIBRATION_STEPS
                    )
                images = pixels_to_tensor(data.pixels[batch], net.spec.mean, net.spec.std, device)
                torch.manual_seed(config.seed * 1_000_003 + step)  # dropout: same after a resume
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
                views = random_resized_crop(
                    images, size, scale=config.crop_scale, generator=generator
                )
                labels = torch.as_tensor(data.labels[batch], device=device)
                with training_forward(net, device, dtype):
                    embeddings = net(views)
                stats = triplet_loss(embeddings, labels, margin=config.margin, mining=mining)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(stats.loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(stats.loss.detach()))
                actives.append(stats.active)
                step += 1
                bar.update(1)
                now = time.monotonic()
                step_times.append(now - last_end)
                last_end = now
                planned = replan_after_calibration(
                    step_times,
                    planned,
                    step,
                    validation_seconds=val_seconds,
                    steps_per_epoch=per_epoch,
                    budget=budget,
                    bar=bar,
                    log=log,
                    name="embedder",
                )
            if losses:
                entry: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "step": step,
                    "loss": float(np.mean(losses)),
                    "active_triplets": float(np.mean(actives)),
                    "mining": mining,
                    "lr": optimizer.param_groups[0]["lr"],
                }
                if validate is not None:
                    metrics, val_seconds = run_validation(net, validate)
                    entry.update(metrics, val_seconds=val_seconds)
                    if metrics[config.select_metric] > best_metric:
                        best_metric, best_epoch = metrics[config.select_metric], epoch + 1
                        best = snapshot(net)
                history.append(entry)
                log(epoch_line("embedder", entry, config.select_metric))
            if stopped_at is None:
                epoch, skip = epoch + 1, 0
            else:
                skip = stopped_at  # a resumed run continues this epoch at this batch
            save(epoch, skip)
    finally:
        bar.close()
    stopped_by = "steps" if step >= planned else "time"
    if best is not None:
        net.load_state_dict(best)
    else:
        best_metric, best_epoch = float("nan"), epoch
    net.eval()
    return TrainResult(
        best_metric=best_metric,
        best_epoch=best_epoch,
        steps_done=step,
        planned_steps=planned,
        epochs_done=epoch,
        stopped_by=stopped_by,
        seconds=time.monotonic() - started,
        history=history,
    )


def copy_net(net: EmbeddingNet) -> EmbeddingNet:
    """An independent copy (training must not touch the caller's serving network)."""
    return copy.deepcopy(net).cpu()
