"""Named embedder profiles: which timm architecture, at which input size.

Torch-free on purpose, so that configuration can be validated without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast

Stem = Literal["patch", "conv"]
STEMS: tuple[str, ...] = ("patch", "conv")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EmbedderSpec:
    """Everything needed to rebuild an embedder's network (its weights live in a file)."""

    timm_name: str
    input_size: int
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hub_pretrained: bool = False
    """True: without a weights file, timm fetches the profile's pretrained weights."""
    stem: Stem = "patch"
    """``"patch"``: timm's patchify convolution; ``"conv"``: a stack of stride-2 convolutions
    with the same token grid (:mod:`searchsvc.models.stem`)."""

    def __post_init__(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "timm_name": self.timm_name,
            "input_size": self.input_size,
            "timm_kwargs": dict(self.timm_kwargs),
            "mean": list(self.mean),
            "std": list(self.std),
            "hub_pretrained": self.hub_pretrained,
            "stem": self.stem,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EmbedderSpec:
        return cls(
            timm_name=str(data["timm_name"]),
            input_size=int(data["input_size"]),
            timm_kwargs=dict(data.get("timm_kwargs", {})),
            mean=tuple(float(v) for v in data.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
            hub_pretrained=bool(data.get("hub_pretrained", False)),
            stem=cast(Stem, str(data.get("stem", "patch"))),  # files written before stems
        )


PROFILES: Mapping[str, EmbedderSpec] = MappingProxyType(
    {
        # A ViT small enough to train and serve on a laptop CPU: 32x32 input, an 8x8 token
        # grid (64 tokens) from a two-layer conv stem, width 128, depth 6. Sized for
        # Fashion-MNIST-like catalogs and tests. The conv stem, against timm's 4x4 patchify
        # layer, measured on Fashion-MNIST classes (this 2-core EPYC, 4 minutes, 2,000 test
        # queries): CMC@1 83.85 against 81.85 in the same minutes, 82.75 in the same steps.
        "small": EmbedderSpec(
            timm_name="vit_small_patch16_224",
            input_size=32,
            timm_kwargs={
                "img_size": 32,
                "patch_size": 4,
                "embed_dim": 128,
                "depth": 6,
                "num_heads": 4,
            },
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            stem="conv",
        ),
        # The small profile at twice the input side: 64x64 pixels, a three-layer conv stem
        # (patch 8) down to the same 8x8 token grid, the same width and depth. The blocks
        # cost what the small profile's cost; only the stem sees 4x the pixels. The laptop
        # default (``Settings.embedder_profile``), chosen for colour photographs: against
        # the small profile at equal steps (2-core Xeon) CMC@1 64.05 vs 61.16 on the
        # real-photo benchmark (66.13 vs 61.97 with STIR at top 5), ingest at the same
        # speed. On grey Fashion-MNIST articles it is level: +1.26 after STIR at equal
        # steps, -0.56 at an equal 10 + 10 minutes (2-core EPYC Zen 4), where small fits
        # more steps. Figures: benchmarks/results/quality.md.
        "small64": EmbedderSpec(
            timm_name="vit_small_patch16_224",
            input_size=64,
            timm_kwargs={
                "img_size": 64,
                "patch_size": 8,
                "embed_dim": 128,
                "depth": 6,
                "num_heads": 4,
            },
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            stem="conv",
        ),
        # The production default: DINO ViT-S/16, 384-d, as in the STIR paper.
        "vit_s16": EmbedderSpec(
            timm_name="vit_small_patch16_224.dino",
            input_size=224,
            hub_pretrained=True,
        ),
    }
)


def embedder_profile_names() -> list[str]:
    return sorted(PROFILES)
