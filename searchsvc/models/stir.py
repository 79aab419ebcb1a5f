"""STIR: a concatenation Siamese transformer that scores a (query, candidate) pair from pixels.

The two images (each preprocessed on its own, ``S x S``) are stacked along the HEIGHT axis,
query on top and candidate below, and one ViT reads the ``3 x 2S x S`` result. The CLS
feature after the final norm goes through a small head to ONE logit for "this pair is a
NEGATIVE" (different product); ``sigmoid(logit)`` is the pair's distance in ``[0, 1]``.

Positional embeddings (``StirConfig.positional``):

``"interpolate"`` (the paper's scheme)
    The embedder's ``gh x gw`` patch grid of positional embeddings is resampled bicubically
    to ``2gh x gw`` once, in :meth:`StirNet.from_embedder`; the class (and register) tokens
    keep their own entries. The backbone is built for ``img_size=(2S, S)``, so timm's own
    forward runs unchanged. The resampling is plain bicubic (``a = -0.75``, half-pixel
    centres, no antialias), as in the DINO code the paper's reference pipeline uses; timm's
    ``resample_abs_pos_embed`` defaults to ``antialias=True``, which for bicubic selects a
    different kernel (``a = -0.5``, PIL's) even when upsampling, so that default is NOT used.

``"split"``
    Each half gets the embedder's own ``gh x gw`` grid unchanged, plus a learned top/bottom
    segment embedding (zero-initialised, so a fresh STIR sees each half exactly as the
    embedder saw the image) added to the patch tokens of that half. The feasibility runs of
    STIR.md found this trains faster for small models.

Cross-attention depth (``StirConfig.joint_blocks``):

``None`` (the paper)
    Every block attends over the whole stacked pair; the head reads the pair's class token.

``k`` (late fusion, ``"split"`` only)
    The first ``depth - k`` blocks attend within each half only (each image keeps its own
    class token; this equals a block-diagonal attention mask over the stacked pair), the
    last ``k`` attend over both halves. The head reads the two halves' class tokens,
    standardised with the embedder's feature statistics and L2-normalised, as
    ``[a, b, a * b, |a - b|]``. A fresh STIR therefore starts from the embedder's own view
    of each image, and training only has to learn the comparison. Measured on the instance
    benchmark (small profile, 5 CPU minutes): the paper's form ranked the top 5 at 42-44
    CMC@1 against the first stage's 63.5 and added nothing when fused; late fusion reached
    56-59 alone and +1 to +2 points fused. See benchmarks/results/.

Only timm ``VisionTransformer`` backbones with a class token and token pooling qualify.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from searchsvc.core.errors import ModelError
from searchsvc.core.profiles import EmbedderSpec
from searchsvc.models.checkpoint import load_checkpoint, save_checkpoint
from searchsvc.models.embedder import EmbeddingNet
from searchsvc.models.runtime import (
    Precision,
    inference_context,
    pixels_to_tensor,
    rerank_autocast_dtype,
    select_device,
)
from searchsvc.models.stem import apply_stem

STIR_KIND = "stir"
Positional = Literal["interpolate", "split"]
_POSITIONAL: tuple[str, ...] = ("interpolate", "split")


@dataclass(frozen=True)
class StirConfig:
    """Everything needed to rebuild a STIR network (its weights live in a file)."""

    spec: EmbedderSpec
    """The backbone architecture; each image of a pair is ``spec.input_size`` square."""
    head_hidden: int | None = None
    """Width of the head's hidden layer; None: half the backbone's feature size."""
    dropout: float = 0.5
    positional: Positional = "interpolate"
    symmetric: bool = False
    """True: :meth:`StirNet.distances` averages the distances of (q, c) and (c, q)."""
    joint_blocks: int | None = None
    """None: every block sees the whole pair (the paper). ``k``: only the last ``k`` blocks
    do, the earlier ones read each image alone (late fusion; needs ``"split"``)."""
    fusion_weight: float = 0.0
    """How much of the first-stage distance the rerank blends into STIR's distance
    (:func:`searchsvc.models.fusion.fuse_distances`); 0 = the paper's rule, STIR alone. The
    trainer fits it on validation after training (score calibration)."""
    calibrated_top_n: int | None = None
    """The top_n at which ``fusion_weight`` (and ``symmetric``) were chosen; a query that
    reranks another top_n is told (:class:`searchsvc.models.fusion.RerankPlan`)."""

    def __post_init__(self) -> None:
        if self.positional not in _POSITIONAL:
            raise ValueError(f"positional must be one of {_POSITIONAL}, got {self.positional!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.joint_blocks is not None:
            if self.joint_blocks < 0:
                raise ValueError(f"joint_blocks must be >= 0, got {self.joint_blocks}")
            if self.positional != "split":
                raise ValueError("joint_blocks (late fusion) needs the 'split' positional scheme")
        if not (0.0 <= self.fusion_weight < float("inf")):
            raise ValueError(f"fusion_weight must be finite and >= 0, got {self.fusion_weight}")
        if self.calibrated_top_n is not None and self.calibrated_top_n < 2:
            raise ValueError(f"calibrated_top_n must be at least 2, got {self.calibrated_top_n}")
        if self.head_hidden is not None and self.head_hidden < 1:
            raise ValueError(f"head_hidden must be positive, got {self.head_hidden}")

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(),
            "head_hidden": self.head_hidden,
            "dropout": self.dropout,
            "positional": self.positional,
            "symmetric": self.symmetric,
            "joint_blocks": self.joint_blocks,
            "fusion_weight": self.fusion_weight,
            "calibrated_top_n": self.calibrated_top_n,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StirConfig:
        hidden = data.get("head_hidden")
        return cls(
            spec=EmbedderSpec.from_json(data["spec"]),
            head_hidden=None if hidden is None else int(hidden),
            dropout=float(data.get("dropout", 0.5)),
            positional=cast(Positional, str(data.get("positional", "interpolate"))),
            symmetric=bool(data.get("symmetric", False)),
            joint_blocks=None if data.get("joint_blocks") is None else int(data["joint_blocks"]),
            fusion_weight=float(data.get("fusion_weight", 0.0)),
            calibrated_top_n=(
                None if data.get("calibrated_top_n") is None else int(data["calibrated_top_n"])
            ),
        )


def resample_pos_grid(
    pos_embed: torch.Tensor, num_prefix: int, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """``(1, P + gh*gw, D)`` -> ``(1, P + nh*nw, D)``: the ``P`` prefix entries (class and
    register tokens) kept as they are, the patch grid resampled bicubically (``a = -0.75``,
    ``align_corners=False``, no antialias)."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = grid.shape[-1]
    if grid.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"pos_embed has {grid.shape[1]} patch entries, not {old_grid} grid")
    image = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=new_grid, mode="bicubic", align_corners=False)
    resampled = image.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, resampled.to(pos_embed.dtype)], dim=1)


def _create_pair_backbone(spec: EmbedderSpec) -> VisionTransformer:
    """The spec's timm ViT, without classifier, sized for a ``(2S, S)`` pair input."""
    size = spec.input_size
    kwargs = {**dict(spec.timm_kwargs), "img_size": (2 * size, size)}
    try:
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelError(
            f"cannot create timm model {spec.timm_name!r} as a STIR backbone (a timm "
            f"VisionTransformer sized for img_size={kwargs['img_size']}): {exc}"
        ) from None
    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"STIR needs a timm VisionTransformer backbone; {spec.timm_name!r} is "
            f"{type(model).__name__}"
        )
    if model.cls_token is None or model.global_pool != "token" or model.pos_embed is None:
        raise ModelError(
            f"STIR needs a ViT with a class token, token pooling and learned positional "
            f"embeddings; {spec.timm_name!r} has global_pool={model.global_pool!r}"
        )
    apply_stem(model, spec)
    return model


class StirNet(nn.Module):
    """(query, candidate) pixels -> one logit for "the pair is NEGATIVE"."""

    def __init__(self, config: StirConfig) -> None:
        super().__init__()
        self.config = config
        self.spec = config.spec
        self.backbone = _create_pair_backbone(config.spec)
        self.dim = int(self.backbone.num_features)
        patch = tuple(self.backbone.patch_embed.patch_size)
        size = config.spec.input_size
        if size % patch[0] or size % patch[1]:
            raise ModelError(f"input size {size} is not a multiple of the patch size {patch}")
        self.half_grid: tuple[int, int] = (size // patch[0], size // patch[1])
        # Prefix tokens (class, registers) that carry their own positional entry.
        self.pos_prefix = 0 if self.backbone.no_embed_class else self.backbone.num_prefix_tokens
        self.segment_embed: nn.Parameter | None = None
        if config.positional == "split":
            single = self.pos_prefix + self.half_grid[0] * self.half_grid[1]
            pos = cast(nn.Parameter, self.backbone.pos_embed)
            self.backbone.pos_embed = nn.Parameter(pos.detach()[:, :single].clone())
            self.segment_embed = nn.Parameter(torch.zeros(2, self.dim))
        depth = len(self.backbone.blocks)
        if config.joint_blocks is not None and config.joint_blocks > depth:
            raise ModelError(f"joint_blocks {config.joint_blocks} exceeds the depth {depth}")
        if config.joint_blocks is None:
            hidden = config.head_hidden or self.dim // 2
            self.head = nn.Sequential(
                nn.Linear(self.dim, hidden),
                nn.Sigmoid(),
                nn.Dropout(config.dropout),
                nn.Linear(hidden, 1, bias=False),
            )
        else:
            # Late fusion: the head compares two feature vectors, so it sees their product
            # and difference directly (a cosine is one linear read-out away).
            hidden = config.head_hidden or self.dim
            self.head = nn.Sequential(
                nn.Linear(4 * self.dim, hidden),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(hidden, 1),
            )
        # The embedder's feature statistics (its BatchNorm), for the late-fusion head.
        self.register_buffer("feature_mean", torch.zeros(self.dim))
        self.register_buffer("feature_std", torch.ones(self.dim))

    @classmethod
    def from_embedder(cls, net: EmbeddingNet, config: StirConfig | None = None) -> StirNet:
        """A STIR whose backbone starts as an exact copy of the embedder's.

        ``pos_embed`` is the only tensor that changes: resampled to the pair grid in
        ``"interpolate"`` mode (see :func:`resample_pos_grid`), copied as is in ``"split"``.
        The embedder's BatchNorm statistics are copied for the late-fusion head (unused
        otherwise). The head is freshly initialised.
        """
        config = config or StirConfig(spec=net.spec)
        if _architecture(config.spec) != _architecture(net.spec):
            raise ModelError(
                f"STIR config architecture {_architecture(config.spec)} does not match the "
                f"embedder's {_architecture(net.spec)}"
            )
        stir = cls(config)
        state = {k: v.detach().clone() for k, v in net.backbone.state_dict().items()}
        if config.positional == "interpolate" and "pos_embed" in state:
            grid = stir.half_grid
            state["pos_embed"] = resample_pos_grid(
                state["pos_embed"], stir.pos_prefix, grid, (2 * grid[0], grid[1])
            )
        try:
            stir.backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"embedder weights do not fit the STIR backbone ({exc})") from None
        bn = net.bn
        if bn.running_mean is not None and bn.running_var is not None:
            with torch.no_grad():
                cast(torch.Tensor, stir.feature_mean).copy_(bn.running_mean)
                cast(torch.Tensor, stir.feature_std).copy_((bn.running_var + bn.eps).sqrt())
        return stir

    def features(self, pairs: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 2S, S)`` stacked pairs -> ``(N, dim)`` CLS features after the final norm."""
        if self.segment_embed is None:
            return cast(torch.Tensor, self.backbone(pairs))
        return self._split_features(pairs)

    def _split_features(self, pairs: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        assert self.segment_embed is not None and b.pos_embed is not None
        n, size = pairs.shape[0], self.spec.input_size
        halves = self._patches(torch.cat([pairs[:, :, :size], pairs[:, :, size:]]))
        x = torch.cat([halves[:n], halves[n:]], dim=1)  # the pair's grid, top half first
        pos = b.pos_embed
        grid = pos[:, self.pos_prefix :]
        patch_pos = torch.cat([grid + self.segment_embed[0], grid + self.segment_embed[1]], dim=1)
        x = x + patch_pos
        prefix = [cast(torch.Tensor, b.cls_token).expand(x.shape[0], -1, -1)]
        if b.reg_token is not None:
            prefix.append(b.reg_token.expand(x.shape[0], -1, -1))
        tokens = torch.cat(prefix, dim=1)
        if self.pos_prefix:
            tokens = tokens + pos[:, : self.pos_prefix]
        x = b.pos_drop(torch.cat([tokens, x], dim=1))
        x = b.norm_pre(b.patch_drop(x))
        x = b.norm(b.blocks(x))
        return cast(torch.Tensor, b.forward_head(x, pre_logits=True))

    def forward(self, query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` x 2 -> ``(N,)`` logits, single order (query on top)."""
        size = self.spec.input_size
        if query.shape != candidates.shape or tuple(query.shape[1:]) != (3, size, size):
            raise ValueError(
                f"expected query and candidates of shape (N, 3, {size}, {size}), got "
                f"{tuple(query.shape)} and {tuple(candidates.shape)}"
            )
        if self.config.joint_blocks is not None:
            n = query.shape[0]
            index = torch.arange(n, device=query.device)
            return self.pair_logits(torch.cat([query, candidates]), index, index + n)
        pairs = torch.cat([query, candidates], dim=2)  # along the height axis
        return cast(torch.Tensor, self.head(self.features(pairs))).squeeze(-1)

    def pair_logits(
        self, images: torch.Tensor, first: torch.Tensor, second: torch.Tensor
    ) -> torch.Tensor:
        """``(M, 3, S, S)`` images and ``(P,)`` index vectors -> ``(P,)`` logits of the pairs
        ``(images[first[i]], images[second[i]])``, ``first`` on top.

        Under late fusion an image's per-image blocks run ONCE however many pairs it is in
        (a query against its top_n candidates: ``top_n + 1`` images, not ``2 top_n``); the
        joint blocks and the head run per pair. The paper's form reads stacked pixels, so
        there every pair is its own forward."""
        if self.config.joint_blocks is None:
            return self(images[first], images[second])
        tokens = self._image_tokens(images)
        return self._pair_head(tokens, first, second)

    def _pair_head(
        self, tokens: torch.Tensor, first: torch.Tensor, second: torch.Tensor
    ) -> torch.Tensor:
        features = self._joint_features(torch.cat([tokens[first], tokens[second]]))
        return cast(torch.Tensor, self.head(features)).squeeze(-1)

    def _image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``(M, 3, S, S)`` -> ``(M, L, D)``: each image's tokens after the blocks that read
        it alone (late fusion: all but the last ``joint_blocks``)."""
        b = self.backbone
        assert b.pos_embed is not None and self.config.joint_blocks is not None
        m = images.shape[0]
        x = self._patches(images) + b.pos_embed[:, self.pos_prefix :]
        pos = b.pos_embed
        prefix = [cast(torch.Tensor, b.cls_token).expand(m, -1, -1)]
        if b.reg_token is not None:
            prefix.append(b.reg_token.expand(m, -1, -1))
        tokens = torch.cat(prefix, dim=1)
        if self.pos_prefix:
            tokens = tokens + pos[:, : self.pos_prefix]
        x = b.norm_pre(b.patch_drop(b.pos_drop(torch.cat([tokens, x], dim=1))))
        depth = len(b.blocks)
        for block in b.blocks[: depth - self.config.joint_blocks]:
            x = block(x)
        return x

    def _joint_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(2P, L, D)`` per-image tokens (the pairs' first images, then their second ones)
        -> ``(P, 4 * dim)``: the last blocks over each stacked pair, then the head's input."""
        b = self.backbone
        assert self.segment_embed is not None and self.config.joint_blocks is not None
        n = x.shape[0] // 2
        depth = len(b.blocks)
        if self.config.joint_blocks:
            length = x.shape[1]
            joint = torch.cat([x[:n] + self.segment_embed[0], x[n:] + self.segment_embed[1]], dim=1)
            for block in b.blocks[depth - self.config.joint_blocks :]:
                joint = block(joint)
            x = torch.cat([joint[:, :length], joint[:, length:]])
        features = b.forward_head(b.norm(x), pre_logits=True)
        mean, std = cast(torch.Tensor, self.feature_mean), cast(torch.Tensor, self.feature_std)
        features = F.normalize((features - mean) / std, dim=-1)
        first, second = features[:n], features[n:]
        return torch.cat([first, second, first * second, (first - second).abs()], dim=-1)

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        """``(M, 3, S, S)`` -> ``(M, T, D)`` patch tokens, each image embedded ALONE: a
        convolutional stem's 3 x 3 kernels would reach across the seam of a stacked pair, so
        each image is seen exactly as the embedder saw it."""
        patch_embed = self.backbone.patch_embed
        x = patch_embed.proj(images).flatten(2).transpose(1, 2)
        return cast(torch.Tensor, patch_embed.norm(x))

    def distances(self, query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32 distances in ``[0, 1]``: ``sigmoid(logit)``; with
        ``config.symmetric`` the mean of the distances of (q, c) and (c, q)."""
        n = query.shape[0]
        index = torch.arange(n, device=query.device)
        return self.pair_distances(torch.cat([query, candidates]), index, index + n)

    def pair_distances(
        self, images: torch.Tensor, first: torch.Tensor, second: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`pair_logits` as float32 distances in ``[0, 1]``; with ``config.symmetric``
        the mean over both orders (the per-image blocks still run once per image)."""
        if not self.config.symmetric:
            return torch.sigmoid(self.pair_logits(images, first, second).float())
        n = first.shape[0]
        if self.config.joint_blocks is None:
            both = self.pair_logits(images, torch.cat([first, second]), torch.cat([second, first]))
        else:
            tokens = self._image_tokens(images)
            both = self._pair_head(tokens, torch.cat([first, second]), torch.cat([second, first]))
        probs = torch.sigmoid(both.float())
        return (probs[:n] + probs[n:]) / 2


def _architecture(spec: EmbedderSpec) -> tuple[str, int, str, str]:
    """What must agree between an embedder and a STIR built from it (JSON form, so that a
    tuple and the list it became in a config file compare equal)."""
    kwargs = json.dumps(dict(spec.timm_kwargs), sort_keys=True, default=str)
    return spec.timm_name, spec.input_size, kwargs, spec.stem


def save_stir(net: StirNet, path: Path, extra: dict[str, Any] | None = None) -> None:
    """``path`` (safetensors) + its JSON config with ``kind="stir"``."""
    config = {
        **(extra or {}),
        "kind": STIR_KIND,
        "stir": net.config.to_json(),
        "dim": net.dim,
    }
    save_checkpoint(path, net.state_dict(), config)


def load_stir(path: Path) -> StirNet:
    """Rebuild a STIR from its file; weights come from the file only (never the hub)."""
    state, config = load_checkpoint(path)
    if config.get("kind") != STIR_KIND:
        raise ModelError(f"{path}: not a STIR file (kind={config.get('kind')!r})")
    try:
        stir_config = StirConfig.from_json(config["stir"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: malformed STIR config ({exc})") from None
    stir_config = replace(stir_config, spec=replace(stir_config.spec, hub_pretrained=False))
    try:
        net = StirNet(stir_config)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit the STIR config ({exc})") from None
    return net.eval()


@dataclass(frozen=True)
class StirInfo:
    input_size: int
    symmetric: bool
    positional: str
    fusion_weight: float = 0.0


class StirScorer:
    """Inference wrapper: uint8 pixels in, float32 pair distances in ``[0, 1]`` out.

    Every call is ONE batched forward (both orders of each pair when the config is
    symmetric; under late fusion each distinct image's per-image blocks once). On the CPU
    in fp32 the same input gives bit-identical output on every call; a pair's distance may
    differ in the last bits with the batch it is scored in (kernels block by batch size).
    """

    def __init__(
        self, net: StirNet, *, device: str = "auto", precision: Precision = "auto"
    ) -> None:
        self.device = select_device(device)
        self.dtype = rerank_autocast_dtype(self.device, precision)
        self.net = net.eval().to(self.device)
        if self.device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.spec = net.spec
        self.info = StirInfo(
            input_size=net.spec.input_size,
            symmetric=net.config.symmetric,
            positional=net.config.positional,
            fusion_weight=net.config.fusion_weight,
        )

    @classmethod
    def from_file(
        cls, path: Path, *, device: str = "auto", precision: Precision = "auto"
    ) -> StirScorer:
        return cls(load_stir(path), device=device, precision=precision)

    def _check(self, name: str, pixels: np.ndarray, ndim: int) -> None:
        size = self.info.input_size
        shape = f"({size}, {size}, 3)" if ndim == 3 else f"(N, {size}, {size}, 3)"
        if pixels.ndim != ndim or pixels.shape[-3:] != (size, size, 3):
            raise ValueError(f"expected {name} of shape {shape}, got {pixels.shape}")
        if pixels.dtype != np.uint8:
            raise ValueError(f"expected {name} as uint8, got {pixels.dtype}")

    def _tensor(self, pixels: np.ndarray) -> torch.Tensor:
        batch = pixels_to_tensor(pixels, self.spec.mean, self.spec.std, self.device)
        if self.device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _distances(self, images: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            image_t = self._tensor(images)
            first_t = torch.as_tensor(first, device=self.device)
            second_t = torch.as_tensor(second, device=self.device)
        with inference_context(self.device, self.dtype):
            out = self.net.pair_distances(image_t, first_t, second_t)
        return cast(np.ndarray, out.float().cpu().numpy().astype(np.float32, copy=False))

    def score(self, query_pixels: np.ndarray, candidate_pixels: np.ndarray) -> np.ndarray:
        """One query ``(S, S, 3)`` against ``(N, S, S, 3)`` candidates -> ``(N,)`` distances."""
        self._check("query_pixels", query_pixels, 3)
        self._check("candidate_pixels", candidate_pixels, 4)
        n = len(candidate_pixels)
        if n == 0:
            return np.empty(0, dtype=np.float32)
        images = np.concatenate([query_pixels[None], candidate_pixels])
        return self._distances(images, np.zeros(n, np.int64), np.arange(1, n + 1))

    def score_pairs(self, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Pair ``i`` is ``(queries[i], candidates[i])``: ``(N, S, S, 3)`` x 2 -> ``(N,)``.

        A run of identical rows (a query repeated for each of its candidates, as the
        evaluation lays pairs out) is read once: see :meth:`StirNet.pair_logits`."""
        self._check("queries", queries, 4)
        self._check("candidates", candidates, 4)
        if len(queries) != len(candidates):
            raise ValueError(f"{len(queries)} queries but {len(candidates)} candidates")
        if len(queries) == 0:
            return np.empty(0, dtype=np.float32)
        query_rows, first = _distinct_runs(queries)
        candidate_rows, second = _distinct_runs(candidates)
        images = np.concatenate([query_rows, candidate_rows])
        return self._distances(images, first, second + len(query_rows))


def _distinct_runs(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N, ...)`` -> (the rows that differ from the row before, each row's index into
    them). Only consecutive repeats are merged: a linear scan, no hashing."""
    flat = pixels.reshape(len(pixels), -1)
    starts = np.ones(len(pixels), dtype=bool)
    starts[1:] = np.any(flat[1:] != flat[:-1], axis=1)
    return pixels[starts], np.cumsum(starts) - 1
