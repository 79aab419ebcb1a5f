"""Labelled data from the DB (catalog, positive query photos, hard negatives) and the
split by product."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from searchsvc.core.config import Settings
from searchsvc.core.errors import SearchsvcError
from searchsvc.learning.training_data import (
    PixelLoader,
    load_size_for,
    load_training_data,
    require_val_queries,
    split_data,
    split_of,
)
from searchsvc.storage.db import Database, Feedback, Image, ImageStatus, Product, QueryLog
from searchsvc.storage.pixels import SqlitePixelStore


def _photo(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", (48, 40), (value, value, value)).save(path)
    return path


@pytest.fixture
def db(settings: Settings, tmp_path: Path) -> Database:
    database = Database(settings.sqlalchemy_url)
    with database.session() as session:
        for pid in ("a", "b", "c", "gone"):
            session.add(Product(id=pid, attributes={}, removed=pid == "gone"))
        session.flush()
        rows = [
            ("a", "0.png", ImageStatus.INDEXED),
            ("a", "1.png", ImageStatus.INDEXED),
            ("b", "0.png", ImageStatus.INDEXED),
            ("b", "1.png", ImageStatus.FAILED),  # never trained on
            ("c", "0.png", ImageStatus.INDEXED),  # a product with one image
            ("gone", "0.png", ImageStatus.INDEXED),  # its product was removed
        ]
        for number, (pid, name, status) in enumerate(rows):
            path = _photo(tmp_path / "catalog" / pid / name, 10 * number)
            session.add(
                Image(
                    product_id=pid,
                    filename=name,
                    source_path=str(path),
                    content_hash=f"h-{pid}-{name}",
                    size_bytes=1,
                    status=status,
                )
            )

        def query(qid: str, results: list[dict[str, object]]) -> None:
            path = _photo(tmp_path / "queries" / f"{qid}.png", 200)
            session.add(
                QueryLog(
                    id=qid,
                    image_hash=f"q-{qid}",
                    image_path=str(path),
                    top_k=5,
                    results=results,
                    latency_ms=1.0,
                )
            )

        query("q1", [{"product_id": "b", "image_id": 3}, {"product_id": "a", "image_id": 1}])
        query("q2", [])
        query("q3", [])
        query("q4", [{"product_id": "c", "image_id": 5}])
        session.flush()
        feedback = [
            ("q1", "a", True),  # q1's photo is product a ...
            ("q1", "b", False),  # ... and b, shown (image 3), was wrong: a hard negative
            ("q2", "a", True),  # q2: positive for two products: ambiguous, left out
            ("q2", "b", True),
            ("q3", "c", False),  # q3: first marked wrong for c, then right: right wins
            ("q3", "c", True),
            ("q4", "c", False),  # q4: no positive; c wrong (unlabelled photo)
            ("q4", "gone", True),  # feedback on a removed product is ignored
        ]
        for qid, pid, positive in feedback:
            session.add(Feedback(query_id=qid, product_id=pid, positive=positive))
    yield database
    database.dispose()


def test_labelled_images_and_hard_negatives(db: Database) -> None:
    data = load_training_data(db)
    catalog = sorted((i.label, i.path.name) for i in data.images if i.source == "catalog")
    assert catalog == [("a", "0.png"), ("a", "1.png"), ("b", "0.png"), ("c", "0.png")]
    photos = sorted((i.label, i.query_id) for i in data.images if i.source == "query")
    assert photos == [("a", "q1"), ("c", "q3")]
    negatives = sorted(
        (n.query_id, n.negative_label, n.negative_image_id, n.query_label)
        for n in data.hard_negatives
    )
    assert negatives == [("q1", "b", 3, "a"), ("q4", "c", 5, None)]
    assert data.counts["ambiguous_query_photos"] == 1
    assert data.counts["feedback_for_removed_products"] == 1
    assert data.counts["products"] == 3
    assert data.fingerprint() == load_training_data(db).fingerprint()


def test_split_is_by_product_seeded_and_stable_as_the_catalog_grows() -> None:
    ids = [f"p{n}" for n in range(2000)]
    sides = {pid: split_of(pid, seed=3, val_fraction=0.2) for pid in ids}
    share = sum(side == "val" for side in sides.values()) / len(ids)
    assert 0.17 < share < 0.23
    more = ids + [f"new{n}" for n in range(500)]  # new products do not move old ones
    assert all(split_of(pid, seed=3, val_fraction=0.2) == sides[pid] for pid in more[:2000])
    other_seed = [split_of(pid, seed=4, val_fraction=0.2) for pid in ids]
    assert other_seed != list(sides.values())
    with pytest.raises(ValueError):
        split_of("x", seed=0, val_fraction=1.0)


def test_split_keeps_products_on_one_side_and_records_it(db: Database) -> None:
    data = load_training_data(db)
    # A seed that puts a on the validation side (q1's hard negative names it), c on train
    seed = next(
        s
        for s in range(100)
        if split_of("a", seed=s, val_fraction=0.5) == "val"
        and split_of("c", seed=s, val_fraction=0.5) == "train"
    )
    split = split_data(data, seed=seed, val_fraction=0.5)
    train_labels = {i.label for i in split.train}
    val_labels = {i.label for i in split.val}
    assert train_labels.isdisjoint(val_labels) and "a" in val_labels
    assert [n.query_id for n in split.val_hard_negatives] == ["q1"]
    record = split.record
    assert record["seed"] == seed and record["val"]["query_photos"] >= 1
    assert len(record["val_products_sha256"]) == 64


def test_a_validation_side_without_queries_is_refused(db: Database) -> None:
    data = load_training_data(db)
    seed = next(
        s
        for s in range(200)
        if all(split_of(p, seed=s, val_fraction=0.3) == "train" for p in ("a", "b", "c"))
    )
    with pytest.raises(SearchsvcError, match="validation split has 0 products"):
        require_val_queries(split_data(data, seed=seed, val_fraction=0.3))


def test_pixels_from_the_store_or_the_original(settings: Settings, tmp_path: Path) -> None:
    store = SqlitePixelStore(settings.media_dir)
    original = _photo(tmp_path / "x.png", 90)
    store.put_many([("cached", np.full((32, 32, 3), 7, np.uint8))])
    loader = PixelLoader(10**7, 10**8, store)
    assert (loader.one(original, "cached", 32) == 7).all()  # ingest's copy
    assert (loader.one(original, "cached", 37) == 90).all()  # another size: the original
    pixels, ok = loader.many([(original, "nope"), (tmp_path / "missing.png", "")], 32)
    assert ok.tolist() == [True, False] and (pixels[1] == 0).all()
    assert load_size_for(32) == 37 and load_size_for(224) == 256
