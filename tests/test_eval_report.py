"""``searchsvc eval --report DIR``: an offline HTML page with the sampled queries' top 5
before and after STIR, CMC@k curves and the fusion-weight calibration curve."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from catalog_factory import GeneratedCatalog
from click.testing import CliRunner, Result
from PIL import Image

from searchsvc.cli import main
from searchsvc.core.config import Settings
from searchsvc.core.errors import SearchsvcError
from searchsvc.core.profiles import PROFILES
from searchsvc.learning.evaluation import (
    FUSION_WEIGHTS,
    EvalSet,
    FirstStageResult,
    LabelledQuery,
    queries_on_side,
)
from searchsvc.learning.report import SHOWN, cmc_curve, sample_queries
from searchsvc.learning.training_data import LabelledImage, PixelLoader, split_of
from searchsvc.models.embedder import EmbeddingNet
from searchsvc.models.stir import StirConfig, StirNet, save_stir

S = PROFILES["small"].input_size


def run(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def tiny_stir(path: Path, fusion_weight: float) -> Path:
    spec = dataclasses.replace(
        PROFILES["small"], timm_kwargs={**PROFILES["small"].timm_kwargs, "depth": 2}
    )
    torch.manual_seed(0)
    config = StirConfig(spec=spec, positional="split", dropout=0.0, fusion_weight=fusion_weight)
    save_stir(StirNet.from_embedder(EmbeddingNet(spec), config).eval(), path)
    return path


def example_rows(page: str) -> list[str]:
    return re.findall(r'<tr><td class="label">.*?</tr>', page, flags=re.S)


def decoded_images(fragment: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(data)))
        for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', fragment)
    ]


def test_report_before_and_after_stir_with_the_right_product_marked(
    env_home: Path, catalog: GeneratedCatalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEARCHSVC_EMBEDDER_PROFILE", "small")  # the hand-made STIR's size
    run("ingest", str(catalog.root), "--no-progress")
    queries = next(iter(catalog.held_out.values())).parent

    # The embedder alone (a random init): no STIR columns, no calibration chart.
    plain_dir = tmp_path / "plain"
    run("eval", "--queries", str(queries), "--report", str(plain_dir), "--report-sample", "5")
    plain = (plain_dir / "index.html").read_text()
    assert "No reranker is active" in plain
    assert plain.count("<svg") == 1 and "fusion weight" not in plain
    rows = example_rows(plain)
    assert len(rows) == 5
    for row in rows:
        product = re.search(r"<b>(p\d+)</b>", row).group(1)  # type: ignore[union-attr]
        assert row.count('class="thumb query"') == 1
        titles = re.findall(r'class="thumb (right|wrong)"[^>]*title="(p\d+)"', row)
        assert len(titles) == SHOWN
        # Marked right exactly where the result is an image of the query's product.
        assert all((mark == "right") == (title == product) for mark, title in titles)
        images = decoded_images(row)
        assert len(images) == 1 + SHOWN and all(i.size == (S, S) for i in images)
    # Nothing to fetch: no script, no external address.
    assert "<script" not in plain and "http://" not in plain.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )

    stir_file = tiny_stir(tmp_path / "stir.safetensors", fusion_weight=0.5)
    run("model", "add", "stir", str(stir_file), "--activate")
    stir_dir = tmp_path / "stir"
    run("eval", "--queries", str(queries), "--report", str(stir_dir), "--report-sample", "5")
    page = (stir_dir / "index.html").read_text()
    assert "No reranker is active" not in page and "fusion weight 0.5, as served" in page
    assert page.count("<svg") == 2
    # CMC@k: two curves of 10 points; calibration: one point per weight tried, twice.
    charts = page.split("<svg")[1:]
    assert [c.count("<polyline") for c in charts] == [2, 2]
    assert charts[0].count("<circle") == 2 * 10
    assert charts[1].count("<circle") == 2 * len(FUSION_WEIGHTS)
    assert ">served</text>" in charts[1]
    stir_rows = example_rows(page)
    # The same queries as without STIR: the sample is drawn before results are seen.
    assert [re.search(r"<b>(p\d+)</b>", r).group(1) for r in stir_rows] == [  # type: ignore[union-attr]
        re.search(r"<b>(p\d+)</b>", r).group(1)  # type: ignore[union-attr]
        for r in rows
    ]
    for before, after in zip(rows, stir_rows, strict=True):
        marks = re.findall(r'class="thumb (right|wrong)"[^>]*title="(p\d+)"', after)
        assert len(marks) == 2 * SHOWN
        # STIR at top_n 5 reorders the same five first-stage results.
        first = re.findall(r'class="thumb (?:right|wrong)"[^>]*title="(p\d+)"', before)
        assert sorted(t for _, t in marks[:SHOWN]) == sorted(first)
        assert sorted(t for _, t in marks[SHOWN:]) == sorted(first)


def test_split_report_and_a_screenshot_in_headless_chromium(
    env_home: Path, catalog: GeneratedCatalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEARCHSVC_VAL_FRACTION", "0.5")
    run("ingest", str(catalog.root), "--no-progress")
    out = tmp_path / "split"
    run("eval", "--report", str(out))
    page = (out / "index.html").read_text()
    assert "catalog split (val side)" in page
    assert 1 <= len(example_rows(page)) <= 12
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("chromium is needed (apt package chromium): the report must be seen")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            (out / "index.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The thumbnails' frames are drawn: the page shows the green or red marks in colour.
    green = (pixels[..., 1] > 130) & (pixels[..., 0] < 60) & (pixels[..., 2] < 90)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert green.sum() + red.sum() > 500


def test_sampling_rule_and_cmc_curve_by_hand() -> None:
    gallery = [LabelledImage(label, Path(), "", "catalog") for label in ["a", "a", "b", "c"]]
    eval_set = EvalSet(gallery, list(gallery), np.arange(4), PixelLoader(0, 0))
    ranked = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    result = FirstStageResult.from_ranking(eval_set, ranked, np.zeros((4, 3)))
    # b and c have no other image: only the two a's have something to find.
    assert sample_queries(result, 5, seed=0) == [0, 1]
    assert cmc_curve(result, ranked, 3) == [1.0, 1.0, 1.0]
    swapped = np.array([[2, 1, 3], [2, 3, 0], [0, 1, 3], [0, 1, 2]])
    assert cmc_curve(result, swapped, 3) == [0.0, 0.5, 1.0]
    drawn = sample_queries(result, 1, seed=3)
    assert drawn == sample_queries(result, 1, seed=3) and drawn[0] in (0, 1)


def test_query_photos_of_one_side_of_the_split(settings: Settings) -> None:
    photos = [LabelledQuery(f"p{n:03d}", Path(f"p{n:03d}.jpg")) for n in range(40)]
    val = queries_on_side(photos, settings, "val")
    train = queries_on_side(photos, settings, "train")
    assert sorted([*val, *train], key=lambda q: q.label) == photos
    assert val and all(
        split_of(q.label, seed=settings.split_seed, val_fraction=settings.val_fraction) == "val"
        for q in val
    )
    with pytest.raises(SearchsvcError, match="none of the 1 query photos is of a val-side"):
        queries_on_side(train[:1], settings, "val")
