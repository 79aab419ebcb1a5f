"""The trainer's parts on their own: sampler, miners, losses, augmentation, schedule,
resumable state, and the STIR freeze (which the reference implementation once lost)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from searchsvc.core.profiles import PROFILES
from searchsvc.models.embedder import EmbeddingNet
from searchsvc.models.stir import StirConfig, StirNet
from trainer import stir as stir_module
from trainer.augment import random_resized_crop, resize_pixels
from trainer.data import TrainSet
from trainer.embedder import EmbedderTrainConfig, train_embedder
from trainer.loop import (
    CALIBRATION_STEPS,
    Budget,
    calibrated_step_seconds,
    fine_tuning,
    lr_factor,
    plan_steps,
    replan_after_calibration,
)
from trainer.losses import group_listwise_loss, triplet_loss
from trainer.miners import (
    all_triplets,
    hardest_triplets,
    mine_pairs,
    neighbour_table,
    pairwise_distances,
    relative_distances,
    useful_anchors,
)
from trainer.samplers import BalancedBatchSampler
from trainer.stir import StirTrainConfig, train_stir

SPEC = dataclasses.replace(
    PROFILES["small"], timm_kwargs={**PROFILES["small"].timm_kwargs, "depth": 1}
)


def tiny_data(products: int = 6, views: int = 3, seed: int = 0) -> TrainSet:
    """Products as flat colours with noise, at 36 px (the trainer's load size for 32)."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0, 255, size=(products, 3))
    pixels = np.clip(
        colours[:, None, None, None, :] + rng.normal(0, 12, size=(products, views, 36, 36, 3)),
        0,
        255,
    ).astype(np.uint8)
    names = [f"p{p}" for p in range(products) for _ in range(views)]
    return TrainSet.from_names(pixels.reshape(-1, 36, 36, 3), names)


# ------------------------------------------------------------------------------ sampler


def test_balanced_batches_hold_n_labels_times_n_instances_and_repeat_by_seed() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, -1, -1])  # label 3: one image
    sampler = BalancedBatchSampler(labels, n_labels=2, n_instances=3, seed=5)
    assert len(sampler) == 2 and sampler.batch_size == 6
    batches = list(sampler.epoch(0))
    seen_labels = []
    for batch in batches:
        batch_labels = labels[batch]
        values, counts = np.unique(batch_labels, return_counts=True)
        assert len(values) == 2 and counts.tolist() == [3, 3]
        assert (batch_labels >= 0).all()  # unlabelled items never sampled
        seen_labels.extend(values.tolist())
    assert sorted(seen_labels) == [0, 1, 2, 3]  # an epoch visits every label once
    again = list(BalancedBatchSampler(labels, 2, 3, seed=5).epoch(0))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other = list(BalancedBatchSampler(labels, 2, 3, seed=5).epoch(1))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other, strict=True))


def test_sampler_refuses_what_cannot_make_a_batch() -> None:
    with pytest.raises(ValueError, match="2 distinct labels"):
        BalancedBatchSampler([0, 0, -1], 2, 2)
    with pytest.raises(ValueError, match="n_instances"):
        BalancedBatchSampler([0, 1], 2, 1)


# ------------------------------------------------------------------------------ miners, losses


def test_triplet_loss_hand_computed() -> None:
    # Four unit vectors on the circle; labels a a b b.
    angles = torch.tensor([0.0, 0.5, 1.0, 3.0])
    emb = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    d = pairwise_distances(emb)

    def chord(a: float, b: float) -> float:
        return float(2 * np.sin(abs(a - b) / 2))

    assert d[0, 1].item() == pytest.approx(chord(0, 0.5), abs=1e-5)
    d_ap, d_an = hardest_triplets(d, labels)
    # anchor 0: positive 1 (0.5 rad), closest negative 2 (1.0 rad)
    assert d_ap[0].item() == pytest.approx(chord(0, 0.5), abs=1e-5)
    assert d_an[0].item() == pytest.approx(chord(0, 1.0), abs=1e-5)
    # anchor 2: positive 3 (2.0 rad), closest negative 1 (0.5 rad)
    assert d_ap[2].item() == pytest.approx(chord(1.0, 3.0), abs=1e-5)
    assert d_an[2].item() == pytest.approx(chord(1.0, 0.5), abs=1e-5)
    margin = 0.15
    expected = np.mean(
        [
            max(0.0, chord(0, 0.5) - chord(0, 1.0) + margin),
            max(0.0, chord(0.5, 0) - chord(0.5, 1.0) + margin),
            max(0.0, chord(1.0, 3.0) - chord(1.0, 0.5) + margin),
            max(0.0, chord(3.0, 1.0) - chord(3.0, 0.5) + margin),
        ]
    )
    hardest = triplet_loss(emb, labels, margin=margin, mining="hardest")
    assert hardest.loss.item() == pytest.approx(expected, abs=1e-5)
    assert hardest.triplets == 4

    # all triplets: 4 anchors x 1 positive x 2 negatives; mean over the active ones
    d_ap_all, d_an_all = all_triplets(d, labels, chunk=3)  # chunking must not matter
    assert len(d_ap_all) == 8
    losses = torch.relu(d_ap_all - d_an_all + margin)
    every = triplet_loss(emb, labels, margin=margin, mining="all")
    assert every.loss.item() == pytest.approx(losses[losses > 0].mean().item(), abs=1e-6)
    assert every.active == pytest.approx(float((losses > 0).float().mean()))


def test_mined_pairs_are_the_hardest_and_deduplicated() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-1.0, 0.0]])
    labels = np.array([0, 0, 1, 1])
    first, second, negative = mine_pairs(emb, labels, np.random.default_rng(0), hard_fraction=1.0)
    pairs = {(int(a), int(b)): bool(n) for a, b, n in zip(first, second, negative, strict=True)}
    assert pairs[(0, 1)] is False  # anchor 0: its only positive
    assert pairs[(0, 2)] is True  # anchor 0: closest negative (0.8, 0.6)
    assert (1, 0) not in pairs  # anchor 1's positive is the same pair: kept once
    assert len({tuple(sorted(p)) for p in pairs}) == len(pairs)
    assert all(labels[a] != labels[b] for (a, b), n in pairs.items() if n)
    assert all(labels[a] == labels[b] for (a, b), n in pairs.items() if not n)


# ------------------------------------------------------------------------------ augmentation


def test_random_resized_crop_identity_flip_and_reproducibility() -> None:
    images = torch.rand(3, 3, 16, 16)
    same = random_resized_crop(images, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    torch.testing.assert_close(same, images, atol=1e-4, rtol=0)
    mirrored = random_resized_crop(images, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(mirrored, images.flip(-1), atol=1e-4, rtol=0)
    a = random_resized_crop(images, 8, generator=torch.Generator().manual_seed(3))
    b = random_resized_crop(images, 8, generator=torch.Generator().manual_seed(3))
    assert a.shape == (3, 3, 8, 8) and torch.equal(a, b)
    pixels = np.full((2, 36, 36, 3), 200, np.uint8)
    assert resize_pixels(pixels, 32).shape == (2, 32, 32, 3)
    assert (resize_pixels(pixels, 32) == 200).all()


# ------------------------------------------------------------------------------ schedule


def test_schedule_and_plan() -> None:
    assert lr_factor(0, warmup=4, total=20) == pytest.approx(0.25)
    assert lr_factor(4, warmup=4, total=20) == pytest.approx(1.0)
    assert lr_factor(20, warmup=4, total=20) == pytest.approx(0.01)
    # held at the peak through the calibration steps: they cannot depend on the plan
    held = [lr_factor(s, warmup=4, total=total, hold=12) for s in range(12) for total in (50, 9999)]
    assert held[8:] == [1.0] * (len(held) - 8)
    assert (
        lr_factor(12, warmup=4, total=50, hold=12)
        == 1.0
        > lr_factor(13, warmup=4, total=50, hold=12)
    )
    assert lr_factor(50, warmup=4, total=50, hold=12) == pytest.approx(0.01)
    # the plan's step cost ignores the slow first steps of a fresh process, and an outlier
    warm_up = [0.9, 0.8, 0.6, 0.7, 0.7, 0.8, 0.4, 0.5, 0.4, 0.2]
    steady = [0.22, 0.65, 0.27, 0.26, 0.24, 0.23, 0.23, 0.22, 0.22, 0.22]
    assert calibrated_step_seconds(warm_up + steady) == pytest.approx(0.23)
    assert (
        plan_steps(
            100, 4, seconds_per_step=1, validation_seconds=0, steps_per_epoch=10, budget=Budget()
        )
        == 100
    )
    budget = Budget.of_seconds(10.0)
    planned = plan_steps(
        100, 4, seconds_per_step=1.0, validation_seconds=0.0, steps_per_epoch=10, budget=budget
    )
    assert 4 + 8 <= planned <= 4 + 10
    assert fine_tuning(PROFILES["vit_s16"]) and not fine_tuning(PROFILES["small"])


# ------------------------------------------------------------------------------ resumable


class Crash(Exception):
    pass


def _train(
    state: Path | None, crash_on_validation: int | None = None
) -> tuple[EmbeddingNet, list[dict[str, object]]]:
    torch.manual_seed(0)
    net = EmbeddingNet(SPEC)
    calls = {"n": 0}

    def validate(model: torch.nn.Module) -> dict[str, float]:
        calls["n"] += 1
        if crash_on_validation is not None and calls["n"] == crash_on_validation:
            raise Crash
        return {"cmc@1": 0.5}

    config = EmbedderTrainConfig(
        steps=6, n_labels=3, n_instances=3, warmup_steps=2, device="cpu", precision="fp32"
    )
    result = train_embedder(
        net,
        tiny_data(),
        config,
        validate=validate,
        state_path=state,
        progress=False,
        log=lambda _: None,
    )
    return net, result.history


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Bitwise-comparable runs need one thread. The setting is process-wide, so it is put
    back afterwards: left at 1, later time-budgeted tests trained half the steps (the
    retrain end-to-end test then missed its margin when run after this file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_crashed_embedder_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    reference, _ = _train(None)
    state = tmp_path / "state.safetensors"
    with pytest.raises(Crash):  # validation after epoch 2 (3rd call) dies: state of epoch 1
        _train(state, crash_on_validation=3)
    assert state.is_file()
    resumed, history = _train(state)
    assert [h["step"] for h in history] == [0, 2, 4, 6]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# ------------------------------------------------------------------------------ STIR freeze


def _embedder() -> EmbeddingNet:
    torch.manual_seed(1)
    return EmbeddingNet(SPEC).eval()


def _stir_config(**changes: object) -> StirTrainConfig:
    base = StirTrainConfig(
        steps=8,
        head_only_fraction=0.5,
        n_labels=3,
        n_instances=2,
        lr_full=1e-3,
        device="cpu",
        precision="fp32",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_stir_backbone_is_frozen_in_the_head_phase_and_trains_after() -> None:
    embedder = _embedder()
    start = StirNet.from_embedder(embedder, StirConfig(spec=SPEC, positional="split"))
    initial = {k: v.clone() for k, v in start.backbone.state_dict().items()}
    head_start = [p.detach().clone() for p in start.head.parameters()]
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def on_phase_end(phase: str, net: StirNet) -> None:
        seen[phase] = {k: v.detach().clone() for k, v in net.backbone.state_dict().items()}
        seen[phase + "_head"] = {
            str(i): p.detach().clone() for i, p in enumerate(net.head.parameters())
        }

    # the head phase is at least the calibration steps (they must not depend on the plan)
    steps = 2 * CALIBRATION_STEPS
    net, result = train_stir(
        embedder,
        tiny_data(),
        _stir_config(steps=steps),
        on_phase_end=on_phase_end,
        progress=False,
        log=lambda _: None,
    )
    assert result.steps_done == steps
    assert all(torch.equal(initial[k], v) for k, v in seen["head"].items()), "backbone moved"
    assert any(not torch.equal(head_start[int(i)], v) for i, v in seen["head_head"].items()), (
        "the head did not train in the head phase"
    )
    assert any(not torch.equal(initial[k], v) for k, v in seen["full"].items()), (
        "the backbone did not train after the frozen phase"
    )
    assert all(p.requires_grad for p in net.parameters())  # released on return
    # the embedder given was not modified
    assert all(
        torch.equal(v, _embedder().state_dict()[k]) for k, v in embedder.state_dict().items()
    )


def test_timing_stir_passes_changes_nothing() -> None:
    net = StirNet.from_embedder(_embedder(), StirConfig(spec=SPEC, positional="split")).train()
    stir_module.set_frozen(net, True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    views = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pairs = (torch.tensor([0, 0, 1]), torch.tensor([2, 3, 4]))  # image 0 is in two pairs
    frozen, released = stir_module._time_passes(
        net, views, pairs, torch.tensor([0.0, 1.0, 1.0]), torch.device("cpu"), None
    )
    assert frozen > 0 and released > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert not any(p.requires_grad for p in stir_module.frozen_parameters(net))  # frozen again
    assert not net.backbone.training


def test_a_budget_is_planned_with_the_cost_of_the_steps_to_come() -> None:
    """STIR's timed steps train the head alone; when the full steps cost 3x as much, the
    plan holds about a third as many steps."""
    common = dict(
        planned=10_000,
        done=CALIBRATION_STEPS,
        validation_seconds=0.0,
        steps_per_epoch=100,
        bar=type("Bar", (), {"total": 0, "refresh": lambda self: None})(),
        log=lambda _: None,
        name="stir",
    )
    times = [0.5] + [0.01] * (CALIBRATION_STEPS - 1)
    cheap = replan_after_calibration(times, budget=Budget.of_seconds(30.0), **common)
    dear = replan_after_calibration(
        times, budget=Budget.of_seconds(30.0), later_steps_cost=3.0, **common
    )
    assert 2_900 <= cheap <= CALIBRATION_STEPS + 3_000
    assert dear == pytest.approx(cheap / 3, rel=0.02)


def test_the_last_validation_runs_inside_the_budget() -> None:
    """Stepping stops while a validation still fits: a budgeted run, its validations
    included, ends within its budget (before, the last one ran after the deadline)."""
    torch.manual_seed(0)
    pause = 0.6

    def slow_validation(model: torch.nn.Module) -> dict[str, float]:
        time.sleep(pause)
        return {"cmc@1": 0.5}

    config = EmbedderTrainConfig(
        epochs=1000, n_labels=3, n_instances=3, warmup_steps=2, device="cpu", precision="fp32"
    )
    seconds = 3.0
    result = train_embedder(
        EmbeddingNet(SPEC),
        tiny_data(),
        config,
        validate=slow_validation,
        budget=Budget.of_seconds(seconds),
        progress=False,
        log=lambda _: None,
    )
    assert result.stopped_by == "time" or result.steps_done == result.planned_steps
    assert len(result.history) >= 2  # the start and at least one epoch were validated
    assert result.seconds < seconds + pause / 2


def test_a_freeze_that_does_not_hold_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the optimizer were handed the backbone (the reference's silent failure), the
    trainer stops instead of training on."""
    monkeypatch.setattr(stir_module, "head_parameters", lambda net: list(net.parameters()))
    monkeypatch.setattr(stir_module, "set_frozen", lambda net, frozen: None)
    with pytest.raises(RuntimeError, match="freeze did not hold"):
        train_stir(_embedder(), tiny_data(), _stir_config(), progress=False, log=lambda _: None)


def test_stir_uses_logged_hard_negatives() -> None:
    data = tiny_data()
    pairs = np.array([[0, 3], [1, 4]])
    _, result = train_stir(
        _embedder(),
        data,
        _stir_config(steps=2),
        hard_negatives=pairs,
        progress=False,
        log=lambda _: None,
    )
    assert result.steps_done == 2


# ------------------------------------------------------------------------------ neighbour groups


def test_neighbour_table_is_exact_nearest_first_and_excludes_itself() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    indices, distances = neighbour_table(vectors, 4, chunk=7)  # chunks that do not divide 50
    brute = 1.0 - vectors @ vectors.T
    np.fill_diagonal(brute, np.inf)
    expected = np.argsort(brute, axis=1, kind="stable")[:, :4]
    assert (indices == expected).all()
    assert not (indices == np.arange(50)[:, None]).any()
    assert (np.diff(distances, axis=1) >= 0).all()
    np.testing.assert_allclose(distances, np.take_along_axis(brute, expected, axis=1), atol=1e-6)


def test_useful_anchors_and_relative_distances() -> None:
    labels = np.array([0, 0, 1, 1, -1])
    neighbours = np.array([[1, 2], [0, 3], [3, 3], [0, 1], [0, 2]])
    # item 0: match 1 + non-match 2; item 1: both; item 2: only matches; item 3: only
    # non-matches; item 4: unlabelled, never an anchor
    assert useful_anchors(neighbours, labels).tolist() == [0, 1]
    rel = relative_distances(np.array([[0.1, 0.2, 0.5], [0.3, 0.3, 0.3]]))
    np.testing.assert_allclose(rel, [[0.0, 0.25, 1.0], [0.0, 0.0, 0.0]])


def test_group_listwise_loss_hand_computed_and_the_prior_shifts_it() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 2.0], [0.0, 1.0, 2.0]])
    negative = torch.tensor([[True, False, True], [True, False, True], [True, True, True]])
    # row 3 has no match: skipped. Row 1: uniform -> log 3. Row 2: -logits = (-1, 1, -2);
    # loss = logsumexp(-1, 1, -2) - 1.
    expected = (np.log(3) + (np.log(np.exp(-1) + np.exp(1) + np.exp(-2)) - 1)) / 2
    loss = group_listwise_loss(logits, negative)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # a prior that already ranks the match first leaves less to learn
    prior = torch.tensor([[3.0, 0.0, 3.0], [3.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    assert float(group_listwise_loss(logits, negative, prior)) < float(loss)


def test_neighbour_groups_are_the_first_stage_lists() -> None:
    data = tiny_data(products=5, views=3)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(data.labels), 6)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    groups = stir_module.NeighbourGroups(vectors, data.labels, 4, per_step=3, seed=0)
    table, _ = neighbour_table(vectors, 4)
    batches = list(groups.epoch(0))
    assert len(batches) == len(groups.anchors) // 3
    assert all((a == b).all() for a, b in zip(batches, groups.epoch(0), strict=True))  # seeded
    pairs = groups.pairs(batches[0])
    assert pairs.groups == (3, 4)
    assert (pairs.second.reshape(3, 4) == table[batches[0]]).all()
    assert (pairs.is_negative == (data.labels[pairs.first] != data.labels[pairs.second])).all()


def test_stir_trains_on_neighbour_groups_and_calibrates_its_scoring() -> None:
    calls: list[int] = []

    def validate(model: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        return {
            "cmc@1": 0.5 + 0.1 * len(calls),
            "fusion_weight": float(len(calls)),
            "symmetric": float(len(calls) > 1),
        }

    net, result = train_stir(
        _embedder(),
        tiny_data(products=8, views=3),
        _stir_config(steps=4, pairs="neighbours", group_size=3, anchors_per_step=4),
        validate=validate,
        progress=False,
        log=lambda _: None,
    )
    assert result.steps_done == 4
    # the last validation scored best: its calibrated weight travels with the model
    assert net.config.fusion_weight == float(len(calls)) and len(calls) >= 2
    assert net.config.symmetric  # and so does its choice of pair order
    assert net.config.joint_blocks == 1  # the tiny backbone's whole depth (default: 2)
