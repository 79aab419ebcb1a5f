"""Training the STIR reranker from an embedder.

Recipe (STIR.md, reference pipeline), with the lessons of the feasibility runs:

- initialised from the embedder (:meth:`StirNet.from_embedder`), ``split`` positional
  scheme by default (it trained faster than the interpolated grid on small models);
- pairs mined per balanced batch with the FROZEN embedder's embeddings of the training
  images, computed once and cached: per anchor its hardest positive and hardest negative,
  deduplicated; a curriculum starts from random same/different pairs and moves to the
  mined ones over the first ``curriculum_fraction`` of the steps; logged hard negatives
  (results a shopper marked wrong) are added to every batch;
- RandomResizedCrop (scale 0.8-1.0) + flip on each distinct image of a step (one view of an
  anchor serves all of its pairs) before the pairs are formed;
- BCE with logits, target "the pair is negative";
- phase ``head``: the backbone (and the positional segment embedding) frozen, only the head
  trains (Adam, lr 2e-3); phase ``full``: everything, at a low rate. The reference code's
  freeze once silently stopped working, so the freeze is enforced three ways: frozen
  tensors get no gradient, the optimizer does not hold them, and at the end of the phase
  they are compared with a copy taken at its start (a difference raises);
- model selection by validation CMC@1 after reranking the embedder's top ``top_n``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from searchsvc.core.profiles import EmbedderSpec
from searchsvc.learning.evaluation import Calibration, FirstStageResult, best_calibration
from searchsvc.models.embedder import Embedder, EmbeddingNet
from searchsvc.models.runtime import (
    Precision,
    select_device,
    training_autocast_dtype,
    training_forward,
)
from searchsvc.models.stir import Positional, StirConfig, StirNet, StirScorer
from trainer.data import TrainSet
from trainer.loop import (
    CALIBRATION_STEPS,
    Budget,
    Log,
    TrainResult,
    Validate,
    calibrated_step_seconds,
    fine_tuning,
    lr_factor,
    stderr_log,
)
from trainer.losses import group_listwise_loss, stir_loss
from trainer.miners import mine_pairs, neighbour_table, relative_distances, useful_anchors
from trainer.samplers import BalancedBatchSampler
from trainer.training import Recipe, StepLoss, run_training, seeded_views

Phase = Literal["head", "full"]
PairSource = Literal["neighbours", "batch"]
PhaseHook = Callable[[Phase, StirNet], None]


@dataclass(frozen=True)
class StirTrainConfig:
    epochs: int = 10
    steps: int | None = None
    """Exact number of optimisation steps (overrides ``epochs``)."""
    head_only_fraction: float = 0.1
    """Share of the steps with the backbone frozen (the reference: its first 3 epochs of
    10; shorter here, where the late-fusion head starts from the embedder's features)."""
    lr_head: float = 2e-3
    lr_full: float | None = None
    """None: 1e-5 for a hub-pretrained backbone (the reference recipe), 3e-4 for one
    trained from scratch. Measured on the instance benchmark (one embedder, two STIRs of 10
    minutes side by side): 3e-4 reranked the top 5 to CMC@1 89.98 against 89.05 at 1e-4,
    the top 10 to 90.39 against 89.25 (benchmarks/results/quality.md)."""
    pairs: PairSource = "neighbours"
    """``neighbours``: each step takes ``anchors_per_step`` training images and their
    ``group_size`` nearest neighbours by the frozen embedder, i.e. exactly the lists a
    reranker sees at query time. ``batch``: the reference pipeline's balanced batches
    (``n_labels x n_instances``) with per-anchor hardest pairs and a random-to-hard
    curriculum (``curriculum_fraction``)."""
    anchors_per_step: int = 16
    group_size: int = 6
    listwise: bool = True
    """``neighbours``: add the per-group ranking loss (:func:`group_listwise_loss`) to BCE."""
    residual_weight: float = 2.0
    """``neighbours`` + ``listwise``: the first stage's rescaled distance times this weight
    is added to the group's logits in the ranking loss (residual training; 0: off)."""
    n_labels: int = 16
    n_instances: int = 4
    crop_scale: tuple[float, float] = (0.8, 1.0)
    curriculum_fraction: float = 0.5
    hard_negatives_per_batch: int = 8
    positional: Positional = "split"
    joint_blocks: int | None = 2
    """Late fusion (:class:`StirConfig`): only the last 2 blocks attend across the pair.
    None: the paper's form, every block over the whole pair."""
    dropout: float = 0.1
    select_metric: str = "cmc@1"
    seed: int = 0
    device: str = "auto"
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError("epochs and steps must be positive")
        for name in ("head_only_fraction", "curriculum_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.pairs not in ("neighbours", "batch"):
            raise ValueError(f"pairs must be 'neighbours' or 'batch', got {self.pairs!r}")
        if self.anchors_per_step < 1 or self.group_size < 2:
            raise ValueError("anchors_per_step must be >= 1 and group_size >= 2")
        if self.residual_weight < 0:
            raise ValueError(f"residual_weight must be >= 0, got {self.residual_weight}")

    def full_rate(self, spec: EmbedderSpec) -> float:
        if self.lr_full is not None:
            return self.lr_full
        return 1e-5 if fine_tuning(spec) else 3e-4

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- the frozen part


EMBED_CHUNK = 16 * 256
"""Training images resized and embedded at once by :func:`frozen_embeddings`."""


def frozen_embeddings(
    embedder_net: EmbeddingNet,
    data: TrainSet,
    *,
    device: str = "auto",
    precision: Precision = "auto",
    cache_path: Path | None = None,
) -> np.ndarray:
    """The frozen embedder's vectors of every training image (the query path's view),
    computed once; with ``cache_path`` kept on disk (safetensors) for a resumed run."""
    if cache_path is not None and cache_path.is_file():
        cached = load_file(str(cache_path))["embeddings"]
        if cached.shape[0] == len(data.labels):
            return cached
    embedder = Embedder(_copy(embedder_net), device=device, precision=precision)
    # A chunk at a time (a multiple of the embedding batch, so the batches, and so the
    # vectors, are the ones a single call would make): memory follows the chunk.
    size, n = embedder.info.input_size, len(data.labels)
    vectors = np.empty((n, embedder.info.dim), dtype=np.float32)
    for start in range(0, n, EMBED_CHUNK):
        stop = min(start + EMBED_CHUNK, n)
        vectors[start:stop] = embedder.embed(data.eval_pixels(size, start, stop), batch_size=256)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": vectors}, str(cache_path))
    return vectors


def set_frozen(net: StirNet, frozen: bool) -> None:
    """Freeze (or release) the backbone and the positional segment embedding."""
    for parameter in frozen_parameters(net):
        parameter.requires_grad_(not frozen)
    net.backbone.train(not frozen and net.training)


def frozen_parameters(net: StirNet) -> Iterator[nn.Parameter]:
    yield from net.backbone.parameters()
    if net.segment_embed is not None:
        yield net.segment_embed


def head_parameters(net: StirNet) -> list[nn.Parameter]:
    frozen = {id(p) for p in frozen_parameters(net)}
    return [p for p in net.parameters() if id(p) not in frozen]


def _frozen_copy(net: StirNet) -> list[torch.Tensor]:
    return [p.detach().clone() for p in frozen_parameters(net)]


def _check_unchanged(net: StirNet, before: list[torch.Tensor]) -> None:
    changed = sum(
        not torch.equal(a, b.detach()) for a, b in zip(before, frozen_parameters(net), strict=True)
    )
    if changed:
        raise RuntimeError(
            f"the frozen phase changed {changed} backbone tensors: the freeze did not hold"
        )


# ----------------------------------------------------------------------------- pair sources


@dataclass(frozen=True)
class StepPairs:
    """One step's training pairs (item indices) and, for neighbour groups, their layout."""

    first: np.ndarray
    second: np.ndarray
    is_negative: np.ndarray
    groups: tuple[int, int] | None = None
    """``(G, k)``: the first ``G * k`` pairs are ``G`` groups of ``k`` (row-major)."""
    prior: np.ndarray | None = None
    """``(G, k)`` rescaled first-stage distances of the groups' candidates."""


class NeighbourGroups:
    """Anchors with their ``group_size`` nearest neighbours by the frozen embedder: the
    lists a reranker sees at query time. An epoch visits every useful anchor once (those
    whose group holds a match and a non-match), ``per_step`` at a time, in a seeded order."""

    def __init__(
        self, embeddings: np.ndarray, labels: np.ndarray, group_size: int, per_step: int, seed: int
    ) -> None:
        self.neighbours, distances = neighbour_table(embeddings, group_size)
        self.relative = relative_distances(distances)
        self.labels = labels
        self.anchors = useful_anchors(self.neighbours, labels)
        if len(self.anchors) == 0:
            raise ValueError(
                "no training image has both a match and a non-match among its "
                f"{group_size} nearest neighbours: nothing for a reranker to learn"
            )
        self.per_step = min(per_step, len(self.anchors))
        self.seed = seed

    def __len__(self) -> int:
        return len(self.anchors) // self.per_step

    def epoch(self, epoch: int) -> Iterator[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch, 7]).permutation(self.anchors)
        for b in range(len(self)):
            yield order[b * self.per_step : (b + 1) * self.per_step]

    def pairs(self, anchors: np.ndarray) -> StepPairs:
        k = self.neighbours.shape[1]
        second = self.neighbours[anchors]
        first = np.repeat(anchors, k)
        return StepPairs(
            first=first,
            second=second.reshape(-1),
            is_negative=(self.labels[first] != self.labels[second.reshape(-1)]),
            groups=(len(anchors), k),
            prior=self.relative[anchors],
        )


# ----------------------------------------------------------------------------- training


def train_stir(
    embedder_net: EmbeddingNet,
    data: TrainSet,
    config: StirTrainConfig,
    *,
    embeddings: np.ndarray | None = None,
    hard_negatives: np.ndarray | None = None,
    validate: Validate | None = None,
    budget: Budget | None = None,
    state_path: Path | None = None,
    on_phase_end: PhaseHook | None = None,
    log: Log = stderr_log,
    progress: bool = True,
) -> tuple[StirNet, TrainResult]:
    """A STIR trained from ``embedder_net`` (which is not modified); returns it with the
    best weights (by validation) in eval mode, and what the run did.

    ``embeddings``: the frozen embedder's vectors of ``data`` (:func:`frozen_embeddings`);
    computed here when not given. ``hard_negatives``: ``(M, 2)`` item indices of logged
    (query photo, wrong product image) pairs. ``on_phase_end`` is called after each phase.
    """
    started = time.monotonic()
    device = select_device(config.device)
    dtype = training_autocast_dtype(device, config.precision)
    if embeddings is None:
        embeddings = frozen_embeddings(
            embedder_net, data, device=config.device, precision=config.precision
        )
    torch.manual_seed(config.seed)  # the head's initial weights
    net = StirNet.from_embedder(
        _copy(embedder_net),
        StirConfig(
            spec=embedder_net.spec,
            positional=config.positional,
            dropout=config.dropout,
            joint_blocks=(
                None
                if config.joint_blocks is None  # a shallower backbone: all of its blocks
                else min(
                    config.joint_blocks, len(cast(nn.Sequential, embedder_net.backbone.blocks))
                )
            ),
        ),
    ).to(device)
    net.train()
    recipe = StirRecipe(
        net,
        data,
        embeddings,
        config,
        full_rate=config.full_rate(embedder_net.spec),
        hard_negatives=hard_negatives,
        device=device,
        dtype=dtype,
        on_phase_end=on_phase_end,
        log=log,
    )
    result = run_training(
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
    return net, result


class StirRecipe(Recipe):
    """Pairs scored by the STIR (see the module docstring) for
    :func:`trainer.training.run_training`, in two phases: ``head`` (the backbone frozen,
    Adam on the head), then ``full`` (AdamW on everything, its own warm-up and decay)."""

    name = "stir"

    def __init__(
        self,
        net: StirNet,
        data: TrainSet,
        embeddings: np.ndarray,
        config: StirTrainConfig,
        *,
        full_rate: float,
        hard_negatives: np.ndarray | None,
        device: torch.device,
        dtype: torch.dtype | None,
        on_phase_end: PhaseHook | None,
        log: Log,
    ) -> None:
        self.net = net
        self.stir = net  # typed as what it is (``net`` is any module to the loop)
        self.data = data
        self.embeddings = embeddings
        self.config = config
        self.full_rate = full_rate
        self.negatives = np.zeros((0, 2), np.int64) if hard_negatives is None else hard_negatives
        self.device = device
        self.dtype = dtype
        self.on_phase_end = on_phase_end
        self.log = log
        self.groups: NeighbourGroups | None = None
        self.sampler: BalancedBatchSampler | NeighbourGroups
        if config.pairs == "neighbours":
            self.groups = NeighbourGroups(
                embeddings, data.labels, config.group_size, config.anchors_per_step, config.seed
            )
            self.sampler = self.groups
            log(
                f"stir: {len(self.groups.anchors)} of {len(data.labels)} training images have "
                f"a match and a non-match among their {config.group_size} nearest neighbours"
            )
        else:
            self.sampler = BalancedBatchSampler(
                data.labels, config.n_labels, config.n_instances, config.seed
            )
        self.phase: Phase = "head" if config.head_only_fraction > 0 else "full"
        self._optimizer: torch.optim.Optimizer | None = None
        self._frozen_at_start: list[torch.Tensor] | None = None
        """The frozen tensors as this process's head phase found them (its first step),
        compared when the phase ends."""
        self._timing_batch: (
            tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor] | None
        ) = None
        """The last head step's inputs (views, pairs, targets), timed at calibration."""

    def head_steps(self, planned: int) -> int:
        if self.config.head_only_fraction <= 0:
            return 0
        return max(CALIBRATION_STEPS, round(self.config.head_only_fraction * planned))

    def _optimizer_for(self, phase: Phase) -> torch.optim.Optimizer:
        if phase == "head":
            return torch.optim.Adam(head_parameters(self.stir), lr=self.config.lr_head)
        return torch.optim.AdamW(self.stir.parameters(), lr=self.full_rate, weight_decay=0.01)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        return self.sampler.epoch(epoch)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        assert self._optimizer is not None, "start() builds the optimizer"
        return self._optimizer

    def start(self, saved: Mapping[str, Any] | None) -> None:
        # A resumed run continues in its saved phase, with that phase's optimizer.
        if saved is not None:
            self.phase = saved["phase"]
        set_frozen(self.stir, self.phase == "head")
        self._optimizer = self._optimizer_for(self.phase)

    def progress_fields(self) -> dict[str, Any]:
        return {"phase": self.phase}

    def resume_note(self, epoch: int) -> str:
        return f"{self.phase} phase"

    def _release_backbone(self, step: int) -> None:
        self._check_freeze()
        if self.on_phase_end is not None:
            self.on_phase_end("head", self.stir)
        self.phase = "full"
        self._timing_batch = None
        set_frozen(self.stir, False)
        self.stir.train()
        self._optimizer = self._optimizer_for("full")
        self.log(f"stir: backbone released at step {step}, lr {self.full_rate:.1e}")

    def _check_freeze(self) -> None:
        if self._frozen_at_start is not None:  # None: no head step ran in this process
            _check_unchanged(self.stir, self._frozen_at_start)

    def step_loss(self, step: int, planned: int, batch: np.ndarray) -> StepLoss:
        config, net, device = self.config, self.stir, self.device
        if self.phase == "head":
            if self._frozen_at_start is None:
                self._frozen_at_start = _frozen_copy(net)
            if step >= self.head_steps(planned):
                self._release_backbone(step)
        rng = np.random.default_rng([config.seed, step])
        if self.phase == "full":  # warm-up, then cosine decay over the rest of the plan
            head_steps = self.head_steps(planned)
            factor = lr_factor(step - head_steps, warmup=10, total=max(1, planned - head_steps))
            for group in self.optimizer.param_groups:
                group["lr"] = self.full_rate * factor
        if self.groups is not None:
            pairs = self.groups.pairs(batch)
        else:
            ramp = config.curriculum_fraction * planned
            if ramp <= 0:
                hard = 1.0  # no curriculum
            else:  # random pairs while the plan may still change, then the ramp
                hard = 0.0 if step < CALIBRATION_STEPS else min(1.0, step / ramp)
            first, second, target = mine_pairs(
                self.embeddings[batch], self.data.labels[batch], rng, hard_fraction=hard
            )
            pairs = StepPairs(batch[first], batch[second], target)
        first, second, target = pairs.first, pairs.second, pairs.is_negative
        negatives = self.negatives
        if len(negatives) and config.hard_negatives_per_batch:
            count = min(config.hard_negatives_per_batch, len(negatives))
            rows = negatives[rng.choice(len(negatives), size=count, replace=False)]
            first = np.concatenate([first, rows[:, 0]])
            second = np.concatenate([second, rows[:, 1]])
            target = np.concatenate([target, np.ones(count, dtype=bool)])
        # Each distinct image of the step gets one view, read once by the per-image
        # blocks (an anchor is in group_size pairs): STIR.pair_logits.
        items, where = np.unique(np.concatenate([first, second]), return_inverse=True)
        index = torch.as_tensor(where, device=device)
        first_at, second_at = index[: len(first)], index[len(first) :]
        views = seeded_views(
            self.data.pixels[items],
            mean=net.spec.mean,
            std=net.spec.std,
            size=net.spec.input_size,
            crop_scale=config.crop_scale,
            device=device,
            seed=config.seed,
            step=step,
        )
        is_negative = torch.as_tensor(target, dtype=torch.float32, device=device)
        with training_forward(net, device, self.dtype):
            logits = net.pair_logits(views, first_at, second_at)
        loss = stir_loss(logits, is_negative)
        if config.listwise and pairs.groups is not None and pairs.prior is not None:
            g, k = pairs.groups
            prior = torch.as_tensor(pairs.prior, dtype=torch.float32, device=device)
            loss = loss + group_listwise_loss(
                logits[: g * k].view(g, k),
                is_negative[: g * k].view(g, k),
                config.residual_weight * prior,
            )
        if self.phase == "head":
            self._timing_batch = (views, (first_at, second_at), is_negative)
        accuracy = ((logits.detach() > 0) == (is_negative > 0)).float().mean()
        return StepLoss(loss, {"pair_accuracy": accuracy})

    def epoch_fields(self) -> dict[str, Any]:
        return {"phase": self.phase}

    def after_epoch_validation(self) -> None:
        set_frozen(self.stir, self.phase == "head")  # validation switched modes

    def later_steps_cost(self, step_times: list[float]) -> float:
        if self.phase != "head":
            return 1.0
        assert self._timing_batch is not None
        # The timed steps train the head alone. Planning the budget with their cost
        # over-planned a 10-minute run 2.4x (3,845 steps, 1,615 done): its cosine schedule
        # never decayed. So the forward and backward passes of the last batch are timed
        # frozen and released, and a full step is planned as a timed head step plus the
        # difference (data, optimiser and the time between steps are the same in both).
        views, pairs, is_negative = self._timing_batch
        frozen_pass, released_pass = _time_passes(
            self.stir, views, pairs, is_negative, self.device, self.dtype
        )
        head_seconds = calibrated_step_seconds(step_times)
        full_seconds = head_seconds + max(0.0, released_pass - frozen_pass)
        fraction = self.config.head_only_fraction
        self.log(
            f"stir: a step costs {head_seconds:.3f} s with the backbone frozen, "
            f"{full_seconds:.3f} s released"
        )
        return fraction + (1 - fraction) * full_seconds / head_seconds

    def stepping_ended(self, step: int) -> None:
        if self.phase == "head" and step > 0:
            self._check_freeze()  # the whole run was the frozen phase
            if self.on_phase_end is not None:
                self.on_phase_end("head", self.stir)
        elif self.phase == "full" and self.on_phase_end is not None:
            self.on_phase_end("full", self.stir)

    def finish(self, best_entry: Mapping[str, Any] | None) -> None:
        set_frozen(self.stir, False)
        if best_entry is not None:
            # A validation that calibrates (returns "fusion_weight", "symmetric") decides
            # how the reranker scores and blends in the first stage; the best epoch's
            # choice travels in the STIR file.
            self.stir.config = replace(
                self.stir.config,
                fusion_weight=float(best_entry.get("fusion_weight", 0.0)),
                symmetric=bool(best_entry.get("symmetric", self.stir.config.symmetric)),
            )


def choose_scoring(
    net: StirNet,
    first_stage: FirstStageResult,
    top_n: int,
    *,
    device: str = "auto",
    precision: Precision = "auto",
) -> tuple[Calibration, list[Calibration]]:
    """After training: how the trained STIR scores and blends, chosen on validation
    (``first_stage``: the embedder's ranking of it) and written into ``net.config``: the
    fusion weight, and one-way or symmetric scoring. Returns the choice and every option.

    Done once, outside the training budget: scoring both orders at every validation
    doubled its cost (107 s of a 10-minute budget at 2,500 validation queries)."""
    net.config = replace(net.config, symmetric=False)  # options score one order at a time
    scorer = StirScorer(net, device=device, precision=precision)
    options = first_stage.calibration_options(scorer.score_pairs, net.spec.input_size, top_n)
    choice = best_calibration(options)
    net.config = replace(net.config, fusion_weight=choice.fusion_weight, symmetric=choice.symmetric)
    return choice, options


def _time_passes(
    net: StirNet,
    views: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
    is_negative: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[float, float]:
    """Seconds of one forward and backward pass on this batch with the backbone frozen, and
    with it released, changing nothing: no optimiser step, gradients dropped, buffers
    (BatchNorm statistics) restored, the backbone frozen again (the next step seeds its own
    dropout, so the run goes on as if this never happened).

    Each pass runs twice and the second is timed: the first backward through the backbone
    builds its kernels (in bf16 on a CPU, oneDNN's primitives). Timing that one planned a
    10-minute run at 368 steps that then trained for 3 minutes."""
    # A conv stem's BatchNorm updates its running statistics in a training forward: keep
    # them as they were, like the weights.
    buffers = {name: buffer.detach().clone() for name, buffer in net.named_buffers()}
    seconds: dict[bool, float] = {}
    try:
        for frozen in (True, False):
            set_frozen(net, frozen)
            for _ in range(2):
                started = time.monotonic()
                with training_forward(net, device, dtype):
                    logits = net.pair_logits(views, *pairs)
                stir_loss(logits, is_negative).backward()
                net.zero_grad(set_to_none=True)
                seconds[frozen] = time.monotonic() - started
    finally:
        net.zero_grad(set_to_none=True)
        set_frozen(net, True)
        with torch.no_grad():
            for name, buffer in net.named_buffers():
                buffer.copy_(buffers[name])
    return seconds[True], seconds[False]


def _copy(net: EmbeddingNet) -> EmbeddingNet:
    import copy

    return copy.deepcopy(net).cpu().eval()
