"""The STIR reranker model: shapes, weight transfer, files, inference wrapper, learning."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from searchsvc.core.errors import ModelError
from searchsvc.core.profiles import PROFILES, EmbedderSpec
from searchsvc.models import stir as stir_module
from searchsvc.models.embedder import EmbeddingNet, save_embedder
from searchsvc.models.fusion import merge_reranked
from searchsvc.models.stir import (
    StirConfig,
    StirNet,
    StirScorer,
    load_stir,
    resample_pos_grid,
    save_stir,
)

SPEC = PROFILES["small"]  # 32x32 images, 4x4 patches: 8x8 grid per image, width 128
S = SPEC.input_size
MODES = ("interpolate", "split")


@pytest.fixture(scope="module")
def embedder() -> EmbeddingNet:
    torch.manual_seed(0)
    net = EmbeddingNet(SPEC)
    with torch.no_grad():  # make every tensor distinctive (timm inits cls/pos near zero)
        for p in net.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _stir(embedder: EmbeddingNet, positional: str, **kwargs: Any) -> StirNet:
    torch.manual_seed(1)
    config = StirConfig(spec=SPEC, positional=positional, **kwargs)  # type: ignore[arg-type]
    return StirNet.from_embedder(embedder, config).eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def _pixels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_config_json_round_trip() -> None:
    config = StirConfig(spec=SPEC, head_hidden=32, dropout=0.25, positional="split", symmetric=True)
    assert StirConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    with pytest.raises(ValueError, match="positional"):
        StirConfig(spec=SPEC, positional="sideways")  # type: ignore[arg-type]


@pytest.mark.parametrize("positional", MODES)
def test_shapes_and_distance_range(embedder: EmbeddingNet, positional: str) -> None:
    net = _stir(embedder, positional)
    grid_tokens = (2 * S // 4) * (S // 4)
    pos = net.backbone.pos_embed
    assert pos is not None
    if positional == "interpolate":
        assert pos.shape == (1, 1 + grid_tokens, 128)
    else:
        assert pos.shape == (1, 1 + grid_tokens // 2, 128)
    head: Any = net.head
    assert head[0].out_features == 64  # default hidden = dim // 2
    assert head[3].bias is None
    q, c = _images(3, 1), _images(3, 2)
    with torch.no_grad():
        assert net.features(torch.cat([q, c], dim=2)).shape == (3, 128)
        logits = net(q, c)
        dist = net.distances(q, c)
    assert logits.shape == (3,)
    assert dist.shape == (3,) and dist.dtype == torch.float32
    assert torch.all((dist >= 0) & (dist <= 1))
    torch.testing.assert_close(dist, torch.sigmoid(logits))
    with pytest.raises(ValueError, match="expected query and candidates"):
        net(q, c[:2])


def test_symmetric_distances_average_both_orders(embedder: EmbeddingNet) -> None:
    net = _stir(embedder, "interpolate", symmetric=True)
    q, c = _images(4, 3), _images(4, 4)
    with torch.no_grad():
        both = (torch.sigmoid(net(q, c)) + torch.sigmoid(net(c, q))) / 2
        torch.testing.assert_close(net.distances(q, c), both)
        assert not torch.allclose(net.distances(q, c), torch.sigmoid(net(q, c)))


@pytest.mark.parametrize("positional", MODES)
def test_each_half_influences_the_score(embedder: EmbeddingNet, positional: str) -> None:
    net = _stir(embedder, positional)
    q, c, other = _images(4, 5), _images(4, 6), _images(4, 7)
    with torch.no_grad():
        base = net(q, c)
        assert torch.equal(base, net(q, c))  # eval mode: no dropout noise
        assert (net(q, other) - base).abs().min() > 1e-6  # only the candidates changed
        assert (net(other, c) - base).abs().min() > 1e-6  # only the queries changed
        swapped = net(c, q)
    if positional == "interpolate":
        # the halves sit at different positions: (q, c) and (c, q) are different inputs
        assert not torch.allclose(swapped, base)
    else:
        # both halves share one positional grid and the segment embeddings start at zero:
        # the tokens of (c, q) are a permutation of those of (q, c), and a transformer's CLS
        # output is invariant to that, so a fresh split-mode STIR is exactly symmetric
        # (until it learns segment embeddings)
        torch.testing.assert_close(swapped, base, rtol=0, atol=1e-5)


def test_interpolate_mode_copies_the_embedder_exactly(embedder: EmbeddingNet) -> None:
    net = _stir(embedder, "interpolate")
    source = embedder.backbone.state_dict()
    target = net.backbone.state_dict()
    assert source.keys() == target.keys()
    for name, tensor in source.items():
        if name != "pos_embed":
            assert torch.equal(target[name], tensor), name
    # pos_embed: CLS entry kept, the 8x8 grid resampled bicubically to 16x8
    pos, new = source["pos_embed"], target["pos_embed"]
    assert torch.equal(new[:, :1], pos[:, :1])
    grid = pos[0, 1:].reshape(8, 8, 128).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(16, 8), mode="bicubic", align_corners=False)
    assert torch.equal(new[0, 1:], expected[0].permute(1, 2, 0).reshape(128, 128))
    assert torch.equal(new, resample_pos_grid(pos, 1, (8, 8), (16, 8)))


def test_split_mode_copies_the_embedder_exactly(embedder: EmbeddingNet) -> None:
    net = _stir(embedder, "split")
    source = embedder.backbone.state_dict()
    target = net.backbone.state_dict()
    assert source.keys() == target.keys()
    for name, tensor in source.items():
        assert torch.equal(target[name], tensor), name
    assert net.segment_embed is not None and torch.count_nonzero(net.segment_embed) == 0
    assert net.segment_embed.requires_grad


def test_split_mode_sees_each_half_like_the_embedder(embedder: EmbeddingNet) -> None:
    """With zero segment embeddings, each half's patch tokens enter the blocks exactly as the
    embedder's would: same patch embedding (each half embedded alone, so the small
    profile's conv stem does not read across the seam), same positions."""
    net = _stir(embedder, "split")
    q, c = _images(2, 8), _images(2, 9)
    source_patch_embed: Any = embedder.backbone.patch_embed
    pos = net.backbone.pos_embed
    source_pos: Any = embedder.backbone.pos_embed
    segment = net.segment_embed
    assert pos is not None and source_pos is not None and segment is not None
    with torch.no_grad():
        tokens = net._patches(torch.cat([q, c]))
        torch.testing.assert_close(tokens[:2], source_patch_embed(q), rtol=0, atol=1e-6)
        torch.testing.assert_close(tokens[2:], source_patch_embed(c), rtol=0, atol=1e-6)
        grid = pos[:, 1:]
        for half in (0, 1):
            assert torch.equal(grid + segment[half], source_pos[:, 1:])


def test_from_embedder_rejects_another_architecture(embedder: EmbeddingNet) -> None:
    other = dataclasses.replace(SPEC, timm_kwargs={**SPEC.timm_kwargs, "depth": 2})
    with pytest.raises(ModelError, match="does not match"):
        StirNet.from_embedder(embedder, StirConfig(spec=other))


def test_non_vit_backbone_is_refused() -> None:
    spec = EmbedderSpec(timm_name="resnet10t", input_size=32)
    with pytest.raises(ModelError, match="VisionTransformer"):
        StirNet(StirConfig(spec=spec))


@pytest.mark.parametrize("positional", MODES)
def test_save_load_round_trip(embedder: EmbeddingNet, positional: str, tmp_path: Path) -> None:
    net = _stir(embedder, positional, symmetric=True, head_hidden=48)
    if net.segment_embed is not None:
        with torch.no_grad():
            net.segment_embed.normal_()
    path = tmp_path / "stir.safetensors"
    save_stir(net, path, {"trained_on": "unit-test"})
    config = json.loads(path.with_suffix(".json").read_text())
    assert config["kind"] == "stir" and config["trained_on"] == "unit-test"
    loaded = load_stir(path)
    assert not loaded.training
    assert loaded.config == net.config
    q, c = _images(3, 10), _images(3, 11)
    with torch.no_grad():
        assert torch.equal(loaded(q, c), net(q, c))
        assert torch.equal(loaded.distances(q, c), net.distances(q, c))


def test_load_never_fetches_hub_weights(
    embedder: EmbeddingNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_spec = dataclasses.replace(SPEC, hub_pretrained=True)
    net = StirNet(StirConfig(spec=hub_spec))
    path = tmp_path / "stir.safetensors"
    save_stir(net, path)
    calls: list[bool] = []
    real = stir_module.timm.create_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(bool(kwargs.get("pretrained")))
        return real(*args, **kwargs)

    monkeypatch.setattr(stir_module.timm, "create_model", spy)
    load_stir(path)
    assert calls == [False]


def test_load_errors_name_the_file(embedder: EmbeddingNet, tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ModelError, match="missing.safetensors"):
        load_stir(missing)
    emb_path = tmp_path / "embedder.safetensors"
    save_embedder(embedder, emb_path)
    with pytest.raises(ModelError, match=r"embedder\.safetensors: not a STIR file"):
        load_stir(emb_path)
    # a STIR config whose weights belong to another architecture
    path = tmp_path / "bad.safetensors"
    save_stir(_stir(embedder, "interpolate"), path)
    config = json.loads(path.with_suffix(".json").read_text())
    config["stir"]["positional"] = "split"
    path.with_suffix(".json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"bad\.safetensors: weights do not fit"):
        load_stir(path)
    path.with_suffix(".json").write_text(json.dumps({"kind": "stir"}))
    with pytest.raises(ModelError, match=r"bad\.safetensors: malformed STIR config"):
        load_stir(path)


def test_scorer_scores_one_query_against_candidates(embedder: EmbeddingNet) -> None:
    net = _stir(embedder, "interpolate")
    net.train()  # the scorer must switch dropout off itself
    scorer = StirScorer(net, device="cpu", precision="fp32")
    assert not scorer.net.training
    query, candidates = _pixels((S, S, 3), 1), _pixels((5, S, S, 3), 2)
    first = scorer.score(query, candidates)
    assert first.shape == (5,) and first.dtype == np.float32
    assert np.all((first >= 0) & (first <= 1))
    for _ in range(3):  # CPU fp32: bit-identical on every call
        assert np.array_equal(scorer.score(query, candidates), first)
    # the same pairs through score_pairs: same values (batching may move the last bits)
    pairs = scorer.score_pairs(np.repeat(query[None], 5, axis=0), candidates)
    np.testing.assert_allclose(pairs, first, rtol=0, atol=1e-6)
    # matches the bare network on the same normalised tensors
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)

    def to_tensor(p: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(p).permute(0, 3, 1, 2).float() / 255 - mean) / std

    with torch.no_grad():
        bare = net.distances(to_tensor(np.repeat(query[None], 5, axis=0)), to_tensor(candidates))
    np.testing.assert_allclose(first, bare.numpy(), rtol=0, atol=1e-6)
    assert scorer.score(query, candidates[:0]).shape == (0,)


def test_scorer_pairs_across_queries_and_validation(embedder: EmbeddingNet) -> None:
    scorer = StirScorer(_stir(embedder, "split", symmetric=True), device="cpu", precision="fp32")
    queries, candidates = _pixels((6, S, S, 3), 3), _pixels((6, S, S, 3), 4)
    out = scorer.score_pairs(queries, candidates)
    assert out.shape == (6,)
    assert np.array_equal(out, scorer.score_pairs(queries, candidates))
    # symmetric: swapping the roles gives the same distances
    np.testing.assert_allclose(scorer.score_pairs(candidates, queries), out, atol=1e-6)
    # a per-query call agrees with the cross-query batch
    np.testing.assert_allclose(scorer.score(queries[2], candidates[2:3]), out[2:3], atol=1e-6)
    with pytest.raises(ValueError, match="queries"):
        scorer.score_pairs(queries[:2], candidates)
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(queries[0].astype(np.float32), candidates)
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        scorer.score(queries[0], candidates[:, :16])


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("joint", [None, 0, 2])
def test_indexed_pairs_equal_the_pairs_they_name(
    embedder: EmbeddingNet, joint: int | None, symmetric: bool
) -> None:
    """pair_logits reads each distinct image once; its logits are those of the stacked pairs
    it indexes, whichever image is repeated and in which role."""
    positional = "interpolate" if joint is None else "split"
    net = _stir(_trained_bn(embedder), positional, joint_blocks=joint, symmetric=symmetric)
    images = _images(5, 11)
    first = torch.tensor([0, 0, 0, 3, 4, 2])
    second = torch.tensor([1, 2, 3, 0, 4, 2])
    with torch.no_grad():
        indexed = net.pair_logits(images, first, second)
        direct = net(images[first], images[second])
        torch.testing.assert_close(indexed, direct, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            net.pair_distances(images, first, second),
            net.distances(images[first], images[second]),
            atol=1e-6,
            rtol=0,
        )


def test_scorer_reads_a_repeated_query_once_with_the_same_distances(
    embedder: EmbeddingNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = _stir(_trained_bn(embedder), "split", joint_blocks=2)
    scorer = StirScorer(net, device="cpu", precision="fp32")
    seen: list[int] = []
    image_tokens = net._image_tokens

    def counting(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.shape[0])
        return image_tokens(images)

    monkeypatch.setattr(net, "_image_tokens", counting)
    queries = np.repeat(_pixels((2, S, S, 3), 5), [4, 3], axis=0)  # two queries, 4 + 3 pairs
    candidates = _pixels((7, S, S, 3), 6)
    out = scorer.score_pairs(queries, candidates)
    assert seen == [2 + 7]  # the two queries once each, not seven times
    per_query = np.concatenate(
        [scorer.score(queries[0], candidates[:4]), scorer.score(queries[4], candidates[4:])]
    )
    assert seen[1:] == [1 + 4, 1 + 3]
    np.testing.assert_allclose(out, per_query, atol=1e-6, rtol=0)
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)

    def to_tensor(p: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(p).permute(0, 3, 1, 2).float() / 255 - mean) / std

    with torch.no_grad():
        bare = torch.sigmoid(net(to_tensor(queries), to_tensor(candidates)))
    np.testing.assert_allclose(out, bare.numpy(), atol=1e-6, rtol=0)


# --- learning ---------------------------------------------------------------------------

# Eight well-separated flat colours (corners of the colour cube). A positive pair is two
# noisy photos of the same colour, a negative pair two different colours: the network must
# compare its two halves, since each half alone looks the same in both classes.
PALETTE = np.array(list(itertools.product([26, 230], repeat=3)), dtype=np.float32)


def _photos(colours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flat = PALETTE[colours][:, None, None, :]
    noisy = flat + rng.normal(0.0, 38.0, size=(len(colours), S, S, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


def test_tiny_stir_learns_to_compare_and_reranks_a_true_match_first() -> None:
    # The "small" architecture trimmed to 2 blocks, so that 100 steps take ~10 s on two CPU
    # cores; split positions, no head dropout, lr 2e-3 decayed linearly. Over seeds 0-7 the
    # last-10-step loss ended at 0.03-0.17 and 10/10 queries were reranked right.
    spec = dataclasses.replace(SPEC, timm_kwargs={**SPEC.timm_kwargs, "depth": 2})
    torch.manual_seed(0)
    embedder = EmbeddingNet(spec)
    net = StirNet.from_embedder(embedder, StirConfig(spec=spec, positional="split", dropout=0.0))
    rng = np.random.default_rng(0)
    steps, batch = 100, 32
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    losses = []
    net.train()
    for _ in range(steps):
        anchor = rng.integers(0, 8, batch)
        negative = rng.random(batch) < 0.5
        other = np.where(negative, (anchor + rng.integers(1, 8, batch)) % 8, anchor)
        q, c = _to_tensor(_photos(anchor, rng)), _to_tensor(_photos(other, rng))
        target = torch.from_numpy(negative.astype(np.float32))
        loss = F.binary_cross_entropy_with_logits(net(q, c), target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    assert first > 0.6, first  # starts near chance (ln 2 = 0.693)
    assert last < 0.3, (first, last)

    # Queries whose first stage ranked the true match 4th of 5: STIR puts it first (chance:
    # 1 in 5).
    scorer = StirScorer(net, device="cpu", precision="fp32")
    eval_rng = np.random.default_rng(123)
    wins = 0
    for trial in range(10):
        colour = trial % 8
        wrong = [(colour + d) % 8 for d in (1, 3, 5, 6)]
        ranked = np.array(wrong[:3] + [colour] + wrong[3:])  # first-stage order, match at 3
        query = _photos(np.array([colour]), eval_rng)[0]
        distances = scorer.score(query, _photos(ranked, eval_rng))
        merged = merge_reranked([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], list(distances), top_n=5)
        wins += merged.order[0] == 3
    assert wins >= 8, wins


def test_new_config_fields_round_trip_and_validate() -> None:
    config = StirConfig(spec=SPEC, positional="split", joint_blocks=2, fusion_weight=0.5)
    assert StirConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    with pytest.raises(ValueError, match="split"):
        StirConfig(spec=SPEC, positional="interpolate", joint_blocks=2)
    with pytest.raises(ValueError, match="fusion_weight"):
        StirConfig(spec=SPEC, fusion_weight=-1.0)
    with pytest.raises(ModelError, match="depth"):
        StirNet(StirConfig(spec=SPEC, positional="split", joint_blocks=99))


def _trained_bn(embedder: EmbeddingNet) -> EmbeddingNet:
    """A copy whose BatchNorm holds real statistics (a fresh one is an identity)."""
    net = copy.deepcopy(embedder).train()
    with torch.no_grad():
        for seed in range(3):
            net(_images(16, 100 + seed))
    return net.eval()


def test_late_fusion_without_joint_blocks_sees_each_image_as_the_embedder(
    embedder: EmbeddingNet,
) -> None:
    """joint_blocks=0: the two halves' features ARE the embedder's vectors of the two
    images (its BatchNorm statistics included), so training starts from what serves."""
    net = _trained_bn(embedder)
    stir = _stir(net, "split", joint_blocks=0)
    query, candidates = _images(3, 1), _images(3, 2)
    with torch.no_grad():
        features = stir._joint_features(stir._image_tokens(torch.cat([query, candidates])))
        expected_q, expected_c = net(query), net(candidates)
    dim = stir.dim
    torch.testing.assert_close(features[:, :dim], expected_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(features[:, dim : 2 * dim], expected_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(features[:, 2 * dim : 3 * dim], expected_q * expected_c)


def test_late_fusion_joint_blocks_let_each_half_change_the_other(
    embedder: EmbeddingNet,
) -> None:
    net = _trained_bn(embedder)
    query, other = _images(2, 3), _images(2, 4)
    candidates = _images(2, 5)
    for joint, crosses in ((0, False), (2, True)):
        stir = _stir(net, "split", joint_blocks=joint)
        with torch.no_grad():
            a = stir._joint_features(stir._image_tokens(torch.cat([query, candidates])))
            b = stir._joint_features(stir._image_tokens(torch.cat([other, candidates])))
        dim = stir.dim
        # the candidate's own features move with the query only through joint blocks
        moved = not torch.allclose(a[:, dim : 2 * dim], b[:, dim : 2 * dim], atol=1e-6)
        assert moved is crosses, joint
        assert stir(query, candidates).shape == (2,)
