"""Training pixels on disk, read by index: the same arrays, the same training, and no
whole-split array in memory."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from searchsvc.learning.training_data import PixelLoader
from searchsvc.models.embedder import EmbeddingNet
from tests.test_trainer_units import SPEC, _stir_config, tiny_data
from trainer.data import TrainSet
from trainer.embedder import EmbedderTrainConfig, train_embedder
from trainer.pixel_rows import PixelRows, write_pixel_rows
from trainer.stir import train_stir


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def on_disk(tmp_path: Path, pixels: np.ndarray) -> PixelRows:
    path = tmp_path / "rows.u8"
    path.write_bytes(np.ascontiguousarray(pixels).tobytes())
    return PixelRows(path, len(pixels), pixels.shape[1])


def test_rows_index_like_the_array(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (23, 5, 5, 3), dtype=np.uint8)
    rows = on_disk(tmp_path, pixels)
    assert rows.shape == pixels.shape and len(rows) == 23
    for index in (np.array([3, 0, 22, 3]), np.array([[1, 2], [5, 6]]), np.array([], int)):
        np.testing.assert_array_equal(rows[index], pixels[index])
    np.testing.assert_array_equal(rows[4:11], pixels[4:11])
    np.testing.assert_array_equal(rows[20:], pixels[20:])
    np.testing.assert_array_equal(rows[::5], pixels[::5])
    np.testing.assert_array_equal(rows[7], pixels[7])
    np.testing.assert_array_equal(rows[-1], pixels[-1])
    with pytest.raises(IndexError):
        rows[np.array([23])]
    with pytest.raises(ValueError, match="expected 24 rows"):
        PixelRows(rows.path, 24, 5)


def test_written_rows_skip_unreadable_images_and_keep_the_order(tmp_path: Path) -> None:
    refs = []
    for n in range(5):
        path = tmp_path / f"{n}.png"
        if n == 2:
            path.write_bytes(b"not an image")
        else:
            PILImage.new("RGB", (20, 16), (40 * n, 10, 200)).save(path)
        refs.append((path, f"h{n}"))
    loader = PixelLoader(10_000_000, 10_000_000)
    in_memory, ok = loader.many(refs, 12)
    rows, ok_rows = write_pixel_rows(tmp_path / "train.u8", loader, refs, 12)
    np.testing.assert_array_equal(ok_rows, ok)
    assert ok.tolist() == [True, True, False, True, True]
    np.testing.assert_array_equal(rows[np.arange(4)], in_memory[ok])


def test_training_from_rows_on_disk_equals_training_from_memory(
    tmp_path: Path, one_thread: None
) -> None:
    data = tiny_data()
    disk = TrainSet(on_disk(tmp_path, data.pixels), data.labels)  # type: ignore[arg-type]
    config = EmbedderTrainConfig(
        steps=5, n_labels=3, n_instances=3, warmup_steps=2, device="cpu", precision="fp32"
    )
    weights = []
    for train_set in (data, disk):
        torch.manual_seed(1)
        net = EmbeddingNet(SPEC)
        train_embedder(net, train_set, config, progress=False, log=lambda _: None)
        weights.append(net.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    stir_weights = []
    for train_set in (data, disk):
        torch.manual_seed(1)
        embedder = EmbeddingNet(SPEC).eval()
        net, _ = train_stir(
            embedder, train_set, _stir_config(steps=6), progress=False, log=lambda _: None
        )
        stir_weights.append(net.state_dict())
    assert all(torch.equal(stir_weights[0][k], stir_weights[1][k]) for k in stir_weights[0])


def test_reading_a_batch_allocates_the_batch_not_the_split(tmp_path: Path) -> None:
    path = tmp_path / "big.u8"
    count, size = 4000, 36
    with path.open("wb") as out:  # 15 MB of rows, written without holding them
        for start in range(0, count, 500):
            out.write(np.full((500, size, size, 3), start % 251, np.uint8).tobytes())
    rows = PixelRows(path, count, size)
    tracemalloc.start()
    try:
        batch = rows[np.arange(0, count, 80)]  # 50 rows
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert batch.shape == (50, size, size, 3)
    assert peak < 3 * 50 * size * size * 3 + 64 * 1024
    assert peak < count * size * size * 3 / 20
