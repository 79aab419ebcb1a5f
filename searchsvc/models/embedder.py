"""The first-stage embedder: a timm backbone whose CLS feature becomes a unit vector."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from searchsvc.core.errors import ModelError
from searchsvc.core.files import config_path_for
from searchsvc.core.profiles import PROFILES, EmbedderSpec
from searchsvc.models.checkpoint import load_checkpoint, save_checkpoint
from searchsvc.models.runtime import (
    Precision,
    autocast_dtype,
    inference_context,
    pixels_to_tensor,
    select_device,
)
from searchsvc.models.stem import apply_stem

EMBEDDER_KIND = "embedder"


def create_backbone(spec: EmbedderSpec, *, pretrained: bool) -> nn.Module:
    """The timm network of ``spec`` without a classifier (its output is the pooled feature)."""
    try:
        backbone = timm.create_model(
            spec.timm_name, pretrained=pretrained, num_classes=0, **dict(spec.timm_kwargs)
        )
    except RuntimeError as exc:  # timm reports unknown names and hub failures this way
        raise ModelError(f"cannot create timm model {spec.timm_name!r} ({exc})") from None
    return apply_stem(backbone, spec)


class EmbeddingNet(nn.Module):
    """backbone -> BatchNorm1d (no affine) -> L2 normalisation.

    The BatchNorm before normalising keeps triplet training from collapsing every embedding
    to one point (seen in the feasibility runs of STIR.md); at inference it is a fixed affine
    map, and an identity for an untrained net.
    """

    def __init__(self, spec: EmbedderSpec, *, pretrained: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = create_backbone(spec, pretrained=pretrained)
        self.dim: int = self.backbone.num_features  # type: ignore[assignment]
        self.bn = nn.BatchNorm1d(self.dim, affine=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        return F.normalize(self.bn(features.float()), dim=-1)


def new_embedding_net(
    spec: EmbedderSpec, *, seed: int, weights: Path | None = None
) -> EmbeddingNet:
    """A fresh net: from a safetensors file, the hub's pretrained weights, or a seeded init."""
    torch.manual_seed(seed)  # the random parts (or the whole net) are reproducible
    net = EmbeddingNet(spec, pretrained=spec.hub_pretrained and weights is None)
    if weights is not None:
        state, config = (
            load_checkpoint(weights)
            if weights.with_suffix(".json").exists()
            else (
                _load_bare_safetensors(weights),
                {},
            )
        )
        _check_spec_fits(config, spec, weights)
        _load_backbone_state(net, state, weights)
    return net


def _check_spec_fits(config: dict[str, Any], spec: EmbedderSpec, source: Path) -> None:
    """Weights made for another architecture fail with what differs, not a key list: a
    32 px start checkpoint under the 64 px profile is the likely mistake."""
    if "spec" not in config:
        return  # a bare file: the state dict's keys and shapes are all there is to check
    made_for = _spec_of(config, source)
    wanted = (spec.timm_name, spec.input_size, spec.timm_kwargs, spec.stem)
    if (made_for.timm_name, made_for.input_size, made_for.timm_kwargs, made_for.stem) != wanted:
        raise ModelError(
            f"{source}: made for a {made_for.input_size} px {made_for.timm_name} "
            f"({made_for.timm_kwargs}, {made_for.stem} stem); the configured profile is a "
            f"{spec.input_size} px {spec.timm_name} ({spec.timm_kwargs}, {spec.stem} stem)"
        )


def _spec_of(config: dict[str, Any], source: Path) -> EmbedderSpec:
    """The architecture an embedder file's JSON config records."""
    try:
        return EmbedderSpec.from_json(config["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{source}: malformed embedder config ({exc})") from None


def _load_bare_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
        raise ModelError(f"{path}: not a valid safetensors file ({exc})") from None


def _load_backbone_state(net: EmbeddingNet, state: dict[str, torch.Tensor], source: Path) -> None:
    """Accept a full EmbeddingNet state or a bare backbone state."""
    if not any(key.startswith("backbone.") for key in state):
        state = {f"backbone.{key}": value for key, value in state.items()}
        state.update({f"bn.{k}": v for k, v in net.bn.state_dict().items()})
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{source}: weights do not fit {net.spec.timm_name} ({exc})") from None


def save_embedder(net: EmbeddingNet, path: Path, extra: dict[str, Any] | None = None) -> None:
    config = {"kind": EMBEDDER_KIND, "spec": net.spec.to_json(), "dim": net.dim, **(extra or {})}
    save_checkpoint(path, net.state_dict(), config)


def load_embedding_net(path: Path) -> EmbeddingNet:
    state, config = load_checkpoint(path)
    if config.get("kind") != EMBEDDER_KIND:
        raise ModelError(f"{path}: not an embedder file (kind={config.get('kind')!r})")
    spec = _spec_of(config, path)
    # Weights come from the file: never fetch the hub's here.
    net = EmbeddingNet(EmbedderSpec(**{**spec.__dict__, "hub_pretrained": False}), pretrained=False)
    _load_backbone_state(net, state, path)
    return net


@dataclass(frozen=True)
class EmbedderInfo:
    input_size: int
    dim: int


class Embedder:
    """Inference wrapper: uint8 pixels in, L2-normalised float32 vectors out, batched."""

    def __init__(
        self, net: EmbeddingNet, *, device: str = "auto", precision: Precision = "auto"
    ) -> None:
        self.device = select_device(device)
        self.dtype = autocast_dtype(self.device, precision)
        self.net = net.eval().to(self.device)
        if self.device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.spec = net.spec
        self.info = EmbedderInfo(input_size=net.spec.input_size, dim=net.dim)

    @classmethod
    def from_file(
        cls, path: Path, *, device: str = "auto", precision: Precision = "auto"
    ) -> Embedder:
        return cls(load_embedding_net(path), device=device, precision=precision)

    def warm_up(self) -> None:
        """One throw-away forward: the first call pays for kernel selection and allocation,
        which must not land on a user's first query."""
        size = self.info.input_size
        self.embed(np.zeros((1, size, size, 3), dtype=np.uint8))

    def embed(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, dim) float32 unit vectors."""
        size = self.info.input_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
            raise ValueError(f"expected pixels of shape (N, {size}, {size}, 3), got {pixels.shape}")
        out = np.empty((len(pixels), self.info.dim), dtype=np.float32)
        with inference_context(self.device, self.dtype):
            for start in range(0, len(pixels), batch_size):
                chunk = pixels[start : start + batch_size]
                batch = pixels_to_tensor(chunk, self.spec.mean, self.spec.std, self.device)
                out[start : start + len(chunk)] = self.net(batch).float().cpu().numpy()
        return out


def profile_spec(profile: str) -> EmbedderSpec:
    try:
        return PROFILES[profile]
    except KeyError:
        raise ModelError(f"unknown embedder profile {profile!r}") from None


def embedder_dim(path: Path) -> int:
    """The vector size of an embedder file, read from its JSON config (no weights loaded)."""
    try:
        return int(json.loads(config_path_for(path).read_text(encoding="utf-8"))["dim"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: cannot read the embedder's dimension ({exc})") from None
