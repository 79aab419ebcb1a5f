"""The convolutional patch stem: same token grid, files that remember it, STIR halves kept
apart at the seam."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from searchsvc.core.errors import ModelError
from searchsvc.core.profiles import PROFILES, EmbedderSpec
from searchsvc.models.embedder import EmbeddingNet, load_embedding_net, save_embedder
from searchsvc.models.stem import conv_stem
from searchsvc.models.stir import StirConfig, StirNet, load_stir, save_stir

PATCH_SPEC = dataclasses.replace(PROFILES["small"], stem="patch")
CONV_SPEC = dataclasses.replace(PROFILES["small"], stem="conv")
S = CONV_SPEC.input_size


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def conv_embedder() -> EmbeddingNet:
    """A conv-stem embedder with real BatchNorm statistics (fresh ones are identities)."""
    torch.manual_seed(0)
    net = EmbeddingNet(CONV_SPEC).train()
    with torch.no_grad():
        for p in net.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for seed in range(3):
            net(_images(16, 100 + seed))
    return net.eval()


def test_conv_stem_keeps_the_token_grid_and_width() -> None:
    patch, conv = EmbeddingNet(PATCH_SPEC), EmbeddingNet(CONV_SPEC)
    images = _images(2, 0)
    with torch.no_grad():
        patch_tokens = patch.backbone.patch_embed(images)  # type: ignore[operator]
        conv_tokens = conv.backbone.patch_embed(images)  # type: ignore[operator]
    assert conv_tokens.shape == patch_tokens.shape == (2, (S // 4) ** 2, 128)
    assert isinstance(conv.backbone.patch_embed.proj, torch.nn.Sequential)  # type: ignore[union-attr]
    assert isinstance(patch.backbone.patch_embed.proj, torch.nn.Conv2d)  # type: ignore[union-attr]


def test_conv_stem_widths_and_refusals() -> None:
    stem = conv_stem(3, 384, 16)  # ViT-S/16: four halvings
    widths = [m.out_channels for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert widths == [24, 48, 96, 192, 384]
    assert stem(torch.zeros(1, 3, 64, 32)).shape == (1, 384, 4, 2)
    with pytest.raises(ModelError, match="power of two"):
        conv_stem(3, 128, 6)
    with pytest.raises(ValueError, match="stem"):
        EmbedderSpec(timm_name="x", input_size=32, stem="resnet")  # type: ignore[arg-type]


def test_spec_json_remembers_the_stem_and_old_files_mean_patch() -> None:
    assert EmbedderSpec.from_json(CONV_SPEC.to_json()) == CONV_SPEC
    old = CONV_SPEC.to_json()
    del old["stem"]  # a file written before stems existed
    assert EmbedderSpec.from_json(old).stem == "patch"


def test_embedder_file_round_trip_rebuilds_the_conv_stem(
    conv_embedder: EmbeddingNet, tmp_path: Path
) -> None:
    save_embedder(conv_embedder, tmp_path / "e.safetensors")
    loaded = load_embedding_net(tmp_path / "e.safetensors").eval()
    assert loaded.spec.stem == "conv"
    images = _images(3, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), conv_embedder(images), rtol=0, atol=0)


@pytest.mark.parametrize("positional", ["split", "interpolate"])
def test_stir_refuses_an_embedder_of_another_stem(
    conv_embedder: EmbeddingNet, positional: str
) -> None:
    with pytest.raises(ModelError, match="does not match"):
        StirNet.from_embedder(
            conv_embedder,
            StirConfig(spec=PATCH_SPEC, positional=positional),  # type: ignore[arg-type]
        )


def test_late_fusion_with_a_conv_stem_sees_each_image_as_the_embedder(
    conv_embedder: EmbeddingNet,
) -> None:
    """The 3 x 3 kernels would read across the seam of a stacked pair; STIR embeds each half
    alone, so with no joint block its two feature vectors ARE the embedder's vectors."""
    stir = StirNet.from_embedder(
        conv_embedder, StirConfig(spec=CONV_SPEC, positional="split", joint_blocks=0)
    ).eval()
    query, candidates = _images(3, 2), _images(3, 3)
    with torch.no_grad():
        features = stir._joint_features(stir._image_tokens(torch.cat([query, candidates])))
        expected_q, expected_c = conv_embedder(query), conv_embedder(candidates)
        # the seam matters: embedding the stacked pair in one pass would not give this
        stacked = stir.backbone.patch_embed(torch.cat([query, candidates], dim=2))  # type: ignore[operator]
        alone = conv_embedder.backbone.patch_embed(candidates)  # type: ignore[operator]
    dim = stir.dim
    torch.testing.assert_close(features[:, :dim], expected_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(features[:, dim : 2 * dim], expected_c, atol=1e-5, rtol=0)
    # the candidate's first token row, read in the stacked pair, has seen the query's pixels
    grid = S // 4
    first_row = stacked[:, grid * grid : grid * grid + grid]
    assert not torch.allclose(first_row, alone[:, :grid], atol=1e-4)


def test_stir_file_round_trip_with_a_conv_stem(conv_embedder: EmbeddingNet, tmp_path: Path) -> None:
    torch.manual_seed(1)
    stir = StirNet.from_embedder(
        copy.deepcopy(conv_embedder), StirConfig(spec=CONV_SPEC, positional="split", joint_blocks=2)
    ).eval()
    save_stir(stir, tmp_path / "s.safetensors")
    loaded = load_stir(tmp_path / "s.safetensors")
    query, candidates = _images(4, 4), _images(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(query, candidates), stir(query, candidates), rtol=0, atol=0
        )
