"""The embedder and its model files: round trip, determinism, refusal of bad files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from searchsvc.core.errors import ModelError
from searchsvc.core.profiles import PROFILES
from searchsvc.models.checkpoint import config_path_for, load_checkpoint, save_checkpoint
from searchsvc.models.embedder import (
    Embedder,
    EmbeddingNet,
    embedder_dim,
    load_embedding_net,
    new_embedding_net,
    profile_spec,
    save_embedder,
)

SPEC = PROFILES["small"]
SIZE = SPEC.input_size


def state_digest(net: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def batch(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


OTHER_PROCESS = textwrap.dedent(
    """
    import hashlib
    from searchsvc.models.embedder import new_embedding_net
    from searchsvc.core.profiles import PROFILES

    net = new_embedding_net(PROFILES["small"], seed=0)
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    print(digest.hexdigest())
    """
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The nets are tiny: one thread is as fast, and never spins against a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def other_process() -> Iterator[subprocess.Popen[str]]:
    """A second interpreter making the seed-0 net, started first so it runs alongside."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", OTHER_PROCESS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    yield process
    if process.poll() is None:
        process.kill()
    process.communicate()


@pytest.fixture(scope="module")
def seed0_digest() -> str:
    return state_digest(new_embedding_net(SPEC, seed=0))


@pytest.fixture(scope="module")
def net() -> EmbeddingNet:
    net = new_embedding_net(SPEC, seed=0)
    # Non-trivial BatchNorm statistics: the round trip must carry them, not only the backbone.
    assert net.bn.running_mean is not None and net.bn.running_var is not None
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.05, 0.05)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def embedder(net: EmbeddingNet) -> Embedder:
    return Embedder(net, device="cpu", precision="fp32")


@pytest.fixture
def saved(net: EmbeddingNet, tmp_path: Path) -> Path:
    path = tmp_path / "models" / "embedder.safetensors"
    save_embedder(net, path, extra={"version": 3})
    return path


# --- embeddings ----------------------------------------------------------------------------


def test_embeddings_are_unit_float32(embedder: Embedder):
    vectors = embedder.embed(batch(5))
    assert vectors.shape == (5, embedder.info.dim) == (5, 128)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])  # different images, different vectors


def test_embeddings_are_deterministic(embedder: Embedder):
    pixels = batch(4, seed=3)
    np.testing.assert_array_equal(embedder.embed(pixels), embedder.embed(pixels))


def test_batch_splitting_matches_one_batch(embedder: Embedder):
    pixels = batch(7, seed=5)
    whole = embedder.embed(pixels, batch_size=64)
    for size in (1, 2, 3):
        np.testing.assert_allclose(embedder.embed(pixels, batch_size=size), whole, atol=1e-5)


def test_non_contiguous_input_gives_the_same_vectors(embedder: Embedder):
    pixels = batch(3, seed=6)
    strided = np.ascontiguousarray(pixels[:, ::-1])[:, ::-1]  # a reversed, strided view
    assert not strided.flags.c_contiguous
    np.testing.assert_allclose(embedder.embed(strided), embedder.embed(pixels), atol=1e-6)


def test_empty_batch(embedder: Embedder):
    assert embedder.embed(batch(0)).shape == (0, 128)


@pytest.mark.parametrize(
    "shape",
    [
        (SIZE, SIZE, 3),
        (1, SIZE, SIZE, 4),
        (1, SIZE, SIZE),
        (2, SIZE + 1, SIZE, 3),
        (1, 3, SIZE, SIZE),
    ],
)
def test_embed_rejects_wrong_shapes(embedder: Embedder, shape: tuple[int, ...]):
    with pytest.raises(ValueError) as info:
        embedder.embed(np.zeros(shape, dtype=np.uint8))
    message = str(info.value)
    assert f"(N, {SIZE}, {SIZE}, 3)" in message
    assert str(shape) in message


def test_warm_up_does_not_change_results(net: EmbeddingNet):
    embedder = Embedder(net, device="cpu", precision="fp32")
    pixels = batch(2, seed=8)
    before = embedder.embed(pixels)
    embedder.warm_up()
    np.testing.assert_array_equal(embedder.embed(pixels), before)


# --- seeded initialisation -----------------------------------------------------------------


def test_same_seed_same_weights_different_seed_different_weights(seed0_digest: str):
    assert state_digest(new_embedding_net(SPEC, seed=0)) == seed0_digest
    assert state_digest(new_embedding_net(SPEC, seed=1)) != seed0_digest


# --- model files ---------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_embeddings(
    saved: Path, embedder: Embedder, net: EmbeddingNet
):
    loaded = load_embedding_net(saved)
    assert state_digest(loaded) == state_digest(net)
    assert loaded.spec.to_json() == {**SPEC.to_json(), "hub_pretrained": False}
    again = Embedder(loaded, device="cpu", precision="fp32")
    pixels = batch(6, seed=11)
    np.testing.assert_array_equal(again.embed(pixels), embedder.embed(pixels))


def test_from_file(saved: Path, embedder: Embedder):
    loaded = Embedder.from_file(saved, device="cpu", precision="fp32")
    assert loaded.info == embedder.info
    pixels = batch(2, seed=12)
    np.testing.assert_array_equal(loaded.embed(pixels), embedder.embed(pixels))


def test_saved_files_and_config(saved: Path):
    assert sorted(p.name for p in saved.parent.iterdir()) == [
        "embedder.json",
        "embedder.safetensors",
    ]  # no temporary files left
    config = json.loads(config_path_for(saved).read_text())
    assert config["kind"] == "embedder"
    assert config["dim"] == 128
    assert config["version"] == 3
    assert config["spec"]["timm_name"] == SPEC.timm_name


def test_embedder_dim_reads_the_config(saved: Path):
    assert embedder_dim(saved) == 128
    saved.unlink()  # the weights are not needed to know the size
    assert embedder_dim(saved) == 128


def test_embedder_dim_without_config_names_the_file(tmp_path: Path):
    path = tmp_path / "nothing.safetensors"
    with pytest.raises(ModelError) as info:
        embedder_dim(path)
    assert str(path) in str(info.value)


def test_missing_weights_file(tmp_path: Path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(ModelError, match="not found") as info:
        load_embedding_net(path)
    assert str(path) in str(info.value)


def test_missing_config_is_refused_naming_the_file(saved: Path):
    config_path_for(saved).unlink()
    with pytest.raises(ModelError) as info:
        load_embedding_net(saved)
    assert str(saved) in str(info.value)
    assert "embedder.json" in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"embedder"'])
def test_unreadable_config_is_refused_naming_it(saved: Path, text: str):
    config_path_for(saved).write_text(text)
    with pytest.raises(ModelError) as info:
        load_embedding_net(saved)
    assert str(config_path_for(saved)) in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "tiny"])
def test_corrupt_safetensors_is_refused_naming_the_file(saved: Path, damage: str):
    data = saved.read_bytes()
    corrupt = {
        "truncate": data[: len(data) // 2],
        "garbage": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "tiny": data[:5],
    }[damage]
    saved.write_bytes(corrupt)
    with pytest.raises(ModelError, match="not a valid safetensors file") as info:
        load_embedding_net(saved)
    assert str(saved) in str(info.value)


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_pickle_file_is_refused_and_never_unpickled(saved: Path, tmp_path: Path):
    tripwire = tmp_path / "UNPICKLED"
    torch.save({"weight": torch.zeros(3), "payload": _Tripwire(tripwire)}, saved)
    with pytest.raises(ModelError, match="not a valid safetensors file") as info:
        load_embedding_net(saved)
    assert str(saved) in str(info.value)
    assert not tripwire.exists()


def test_pickle_file_as_bare_weights_is_refused_and_never_unpickled(tmp_path: Path):
    weights = tmp_path / "start.pt"
    tripwire = tmp_path / "UNPICKLED"
    torch.save({"payload": _Tripwire(tripwire)}, weights)
    with pytest.raises(ModelError) as info:
        new_embedding_net(SPEC, seed=0, weights=weights)
    assert str(weights) in str(info.value)
    assert not tripwire.exists()


def test_file_of_another_kind_is_refused(saved: Path):
    config_file = config_path_for(saved)
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "kind": "stir"}))
    with pytest.raises(ModelError) as info:
        load_embedding_net(saved)
    assert str(saved) in str(info.value)
    assert "kind='stir'" in str(info.value)


def test_malformed_spec_is_refused(saved: Path):
    config_file = config_path_for(saved)
    config = json.loads(config_file.read_text())
    del config["spec"]["timm_name"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="malformed embedder config"):
        load_embedding_net(saved)


def test_weights_that_do_not_fit_are_refused(tmp_path: Path, net: EmbeddingNet):
    state = dict(net.state_dict())
    state.pop(next(key for key in state if key.startswith("backbone.")))
    path = tmp_path / "partial.safetensors"
    save_checkpoint(path, state, {"kind": "embedder", "spec": SPEC.to_json(), "dim": 128})
    with pytest.raises(ModelError, match="do not fit") as info:
        load_embedding_net(path)
    assert str(path) in str(info.value)


def test_start_weights_of_another_profile_name_both_sizes(tmp_path: Path, net: EmbeddingNet):
    # A 32 px checkpoint under the 64 px profile: the error says what differs, and the
    # net is never half-loaded.
    weights = tmp_path / "small.safetensors"
    save_embedder(net, weights)
    with pytest.raises(ModelError) as info:
        new_embedding_net(PROFILES["small64"], seed=0, weights=weights)
    message = str(info.value)
    assert str(weights) in message
    assert "made for a 32 px" in message and "configured profile is a 64 px" in message
    # The same file under its own profile starts a net with its exact weights.
    started = new_embedding_net(SPEC, seed=99, weights=weights)
    for name, tensor in net.state_dict().items():
        assert torch.equal(started.state_dict()[name], tensor), name


def test_bare_backbone_safetensors_starts_a_new_net(tmp_path: Path, net: EmbeddingNet):
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in net.backbone.state_dict().items()}, str(weights))
    started = new_embedding_net(SPEC, seed=99, weights=weights)
    for name, tensor in net.backbone.state_dict().items():
        torch.testing.assert_close(started.backbone.state_dict()[name], tensor, rtol=0, atol=0)
    # A fresh BatchNorm (identity statistics), not the donor's.
    assert started.bn.running_mean is not None
    assert torch.equal(started.bn.running_mean, torch.zeros(128))


def test_checkpoint_round_trip_keeps_config_and_tensors(tmp_path: Path):
    path = tmp_path / "deep" / "x.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), "b": torch.ones(1)}
    save_checkpoint(path, tensors, {"kind": "test", "n": [1, 2]})
    state, config = load_checkpoint(path)
    assert config == {"kind": "test", "n": [1, 2]}
    assert torch.equal(state["a"], tensors["a"]) and torch.equal(state["b"], tensors["b"])


def test_unknown_profile():
    with pytest.raises(ModelError, match="'huge'"):
        profile_spec("huge")
    assert profile_spec("small") is SPEC


# Last: the other interpreter has had the whole module's time to finish.
def test_seeded_init_is_the_same_in_another_process(
    other_process: subprocess.Popen[str], seed0_digest: str
):
    stdout, stderr = other_process.communicate(timeout=120)
    assert other_process.returncode == 0, stderr
    assert stdout.strip() == seed0_digest
