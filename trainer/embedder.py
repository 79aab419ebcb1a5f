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

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from searchsvc.core.profiles import EmbedderSpec
from searchsvc.models.embedder import EmbeddingNet
from searchsvc.models.runtime import (
    Precision,
    select_device,
    training_autocast_dtype,
    training_forward,
)
from trainer.data import TrainSet
from trainer.distributed import SINGLE, Distributed
from trainer.loop import (
    CALIBRATION_STEPS,
    Budget,
    Log,
    TrainResult,
    Validate,
    fine_tuning,
    lr_factor,
    stderr_log,
)
from trainer.losses import triplet_loss
from trainer.samplers import BalancedBatchSampler
from trainer.training import Recipe, StepLoss, run_training, seeded_views

Mining = Literal["all", "hardest"]


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
    distributed: Distributed = SINGLE,
) -> TrainResult:
    """Train ``net`` in place; on return it holds the best weights (by validation), in
    eval mode. With ``state_path`` the run resumes from (and keeps saving) that state.
    ``distributed``: this process's rank in a ``torchrun`` run (:mod:`trainer.distributed`):
    each rank trains on its share of every epoch's batches, DDP averaging the gradients."""
    started = time.monotonic()
    config = config.resolve(net.spec)
    device = select_device(config.device)
    dtype = training_autocast_dtype(device, config.precision)
    net.to(device).train()
    recipe = EmbedderRecipe(net, data, config, device, dtype, distributed)
    return run_training(
        recipe,
        planned=config.steps or config.epochs * recipe.steps_per_epoch,
        select_metric=config.select_metric,
        validate=validate,
        budget=budget or Budget(),
        state_path=state_path,
        device=device,
        dtype=dtype,
        log=log,
        progress=progress,
        started=started,
    )


class EmbedderRecipe(Recipe):
    """Triplet loss on balanced batches (see the module docstring) for
    :func:`trainer.training.run_training`."""

    name = "embedder"

    def __init__(
        self,
        net: EmbeddingNet,
        data: TrainSet,
        config: EmbedderTrainConfig,
        device: torch.device,
        dtype: torch.dtype | None,
        distributed: Distributed = SINGLE,
    ) -> None:
        """``config``: resolved (:meth:`EmbedderTrainConfig.resolve`)."""
        assert config.lr is not None and config.crop_scale is not None
        self.net = net
        self.distributed = distributed
        self.spec = net.spec
        self.data = data
        self.config = config
        self.lr = config.lr
        self.crop_scale = config.crop_scale
        self.device = device
        self.dtype = dtype
        self.sampler = BalancedBatchSampler(
            data.labels, config.n_labels, config.n_instances, config.seed
        )
        if len(self.sampler) < distributed.world:
            raise ValueError(
                f"{len(self.sampler)} balanced batches per epoch for {distributed.world} "
                "processes: every process needs a batch (fewer processes, or smaller batches)"
            )
        # The loop validates, snapshots and saves ``net`` itself; only the training
        # forward goes through DDP, whose backward averages the gradients of all ranks.
        self.forward_net: nn.Module = DistributedDataParallel(net) if distributed.active else net
        self._optimizer = torch.optim.AdamW(
            net.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.mining: Mining = "all"
        """The last step's triplets: ``all`` for the first steps, then ``hardest``."""

    @property
    def steps_per_epoch(self) -> int:
        # Every rank takes the same number of steps (a rank left without a batch would
        # leave the others waiting in the gradient all-reduce): the remainder is dropped.
        return len(self.sampler) // self.distributed.world

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        if not self.distributed.active:
            yield from self.sampler.epoch(epoch)
            return
        rank, world = self.distributed.rank, self.distributed.world
        for n, batch in enumerate(self.sampler.epoch(epoch)):
            if n >= self.steps_per_epoch * world:
                return
            if n % world == rank:
                yield batch

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def step_loss(self, step: int, planned: int, batch: np.ndarray) -> StepLoss:
        config = self.config
        all_phase = max(CALIBRATION_STEPS, config.all_triplets_fraction * planned)
        self.mining = "all" if step < all_phase else "hardest"
        for group in self._optimizer.param_groups:
            group["lr"] = self.lr * lr_factor(
                step, warmup=config.warmup_steps, total=planned, hold=CALIBRATION_STEPS
            )
        views = seeded_views(
            self.data.pixels[batch],
            mean=self.spec.mean,
            std=self.spec.std,
            size=self.spec.input_size,
            crop_scale=self.crop_scale,
            device=self.device,
            seed=config.seed,
            step=step,
        )
        labels = torch.as_tensor(self.data.labels[batch], device=self.device)
        with training_forward(self.net, self.device, self.dtype):
            embeddings = self.forward_net(views)
        stats = triplet_loss(embeddings, labels, margin=config.margin, mining=self.mining)
        return StepLoss(stats.loss, {"active_triplets": stats.active})

    def epoch_fields(self) -> dict[str, Any]:
        return {"mining": self.mining}
