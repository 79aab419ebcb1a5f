"""The patch stem of a ViT backbone: timm's one strided convolution, or a small conv stack.

``"patch"`` keeps timm's patchify layer (one ``p x p`` convolution with stride ``p``).
``"conv"`` replaces it with ``log2(p)`` stride-2 ``3 x 3`` convolutions (BatchNorm, GELU)
and a final ``1 x 1`` projection to the embedding width, the "early convolutions" of Xiao
et al. (2021, arXiv:2106.14881): the token grid, the width and everything after the stem
are the same, but a ViT trained from scratch on little data optimises faster and better
with it. Its cost is small beside the blocks (about 2% of the small profile's MACs).

Only the ``proj`` module inside timm's ``PatchEmbed`` is swapped, so timm's own forward,
positional embeddings and state-dict layout (``patch_embed.proj.*``) stay as they were.
"""

from __future__ import annotations

from torch import nn

from searchsvc.core.errors import ModelError
from searchsvc.core.profiles import EmbedderSpec


def conv_stem(in_chans: int, embed_dim: int, patch: int) -> nn.Sequential:
    """``(N, in_chans, H, W)`` -> ``(N, embed_dim, H / patch, W / patch)``."""
    if patch < 2 or patch & (patch - 1):
        raise ModelError(f"a conv stem needs a patch size that is a power of two, got {patch}")
    steps = patch.bit_length() - 1
    # Widths double at each halving and reach half the embedding width: 32, 64 for 128.
    widths = [max(embed_dim >> (steps - i), 8) for i in range(steps)]
    layers: list[nn.Module] = []
    channels = in_chans
    for width in widths:
        layers += [
            nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.GELU(),
        ]
        channels = width
    layers.append(nn.Conv2d(channels, embed_dim, 1))
    return nn.Sequential(*layers)


def apply_stem(backbone: nn.Module, spec: EmbedderSpec) -> nn.Module:
    """Give ``backbone`` (a timm ViT) the stem ``spec.stem`` names; returns it."""
    if spec.stem == "patch":
        return backbone
    patch_embed = getattr(backbone, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride:
        raise ModelError(
            f"stem {spec.stem!r} needs a ViT with a patchify convolution; "
            f"{spec.timm_name!r} has none"
        )
    if proj.kernel_size[0] != proj.kernel_size[1]:
        raise ModelError(f"stem {spec.stem!r} needs square patches, got {proj.kernel_size}")
    patch_embed.proj = conv_stem(proj.in_channels, proj.out_channels, proj.kernel_size[0])  # type: ignore[union-attr]
    return backbone
