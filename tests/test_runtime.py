"""Where and in what precision the models run: the training precision rule and the
attention switch that makes bf16 training fast on a CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from searchsvc.models import runtime
from searchsvc.models.embedder import Embedder, new_embedding_net, profile_spec
from searchsvc.models.runtime import (
    Precision,
    autocast_dtype,
    cpu_has_native_bf16,
    matmul_attention,
    rerank_autocast_dtype,
    training_autocast_dtype,
)
from searchsvc.models.stir import StirConfig, StirNet, StirScorer

CPU = torch.device("cpu")


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\n")
    return path


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    cases = {
        "amx": ("fpu sse2 avx512f amx_bf16 amx_tile", True),
        "avx512": ("fpu sse2 avx512f avx512_bf16", True),
        "neither": ("fpu sse2 avx2 avx512f", False),
    }
    for name, (flags, expected) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        assert cpu_has_native_bf16(_cpuinfo(folder, flags)) is expected, name
    assert not cpu_has_native_bf16(tmp_path / "missing")


@pytest.mark.parametrize("native_bf16", [True, False])
@pytest.mark.parametrize("rule", [training_autocast_dtype, rerank_autocast_dtype])
def test_training_and_rerank_auto_are_bf16_only_on_a_cpu_with_native_bf16(
    rule: Callable[[torch.device, Precision], torch.dtype | None],
    native_bf16: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    assert rule(CPU, "auto") == (torch.bfloat16 if native_bf16 else None)
    # Explicit choices are kept, and the embedder's serving stays exact fp32 on any CPU.
    assert rule(CPU, "fp32") is None
    assert rule(CPU, "bf16") == torch.bfloat16
    assert autocast_dtype(CPU, "auto") is None


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_served_stir_follows_the_rerank_rule_and_the_embedder_stays_exact(
    native_bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    # STIR serves by the rerank rule; the embedder (vectors compared with stored ones) does not.
    embedder_net = new_embedding_net(profile_spec("small"), seed=0)
    stir = StirScorer(StirNet.from_embedder(embedder_net, StirConfig(spec=embedder_net.spec)))
    assert stir.dtype == (torch.bfloat16 if native_bf16 else None)
    assert Embedder(embedder_net, device="cpu", precision="auto").dtype is None


def _fused_flags(net: torch.nn.Module) -> list[bool]:
    return [m.fused_attn for m in net.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


def test_matmul_attention_switches_only_bf16_cpu_training_and_restores() -> None:
    net = new_embedding_net(profile_spec("small"), seed=0)
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    depth = len(_fused_flags(net))
    assert depth == 6
    with matmul_attention(net, CPU, torch.bfloat16) as switched:
        assert switched == depth
        assert _fused_flags(net) == [False] * depth
    assert _fused_flags(net) == [True] * depth
    with matmul_attention(net, CPU, None) as switched:
        assert switched == 0
        assert _fused_flags(net) == [True] * depth


def test_matmul_attention_computes_the_same_function() -> None:
    net = new_embedding_net(profile_spec("small"), seed=0).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = net(images)
        with matmul_attention(net, CPU, torch.bfloat16):
            explicit = net(images)
    assert torch.allclose(fused, explicit, atol=3e-2)
    assert not torch.equal(fused, torch.zeros_like(fused))
