"""The validation side is cut to a bounded, seeded sample of whole products."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from searchsvc.core.config import load_settings
from searchsvc.core.errors import ConfigError
from searchsvc.learning.training_data import (
    LabelledImage,
    TrainingData,
    sample_validation,
    split_data,
)


def catalog(n_products: int, images_each: int) -> TrainingData:
    images = [
        LabelledImage(f"p{p:04d}", Path(f"/x/p{p}/{i}.png"), f"h{p}-{i}", "catalog")
        for p in range(n_products)
        for i in range(images_each)
    ]
    return TrainingData(images, [])


def test_the_sample_is_bounded_whole_products_and_recorded() -> None:
    split = split_data(catalog(400, 3), seed=7, val_fraction=0.5)
    cut = sample_validation(split, 100)
    per_product = Counter(i.label for i in cut.val)
    assert sum(per_product.values()) <= 100
    assert sum(per_product.values()) >= 98  # 3 images a product fill it to within one
    whole = Counter(i.label for i in split.val)
    assert all(per_product[label] == whole[label] for label in per_product)
    assert cut.train == split.train  # the products left out are not trained on either
    assert cut.val_sample == {
        "max_images": 100,
        "seed": 7,
        "products": len(per_product),
        "of_products": len(whole),
        "images": sum(per_product.values()),
        "of_images": len(split.val),
    }
    assert cut.record["val_sample"] == cut.val_sample
    assert cut.record["val"]["images"] == sum(per_product.values())


def test_the_same_seed_gives_the_same_products_and_they_stay_when_the_catalog_grows() -> None:
    small = sample_validation(split_data(catalog(400, 3), seed=7, val_fraction=0.5), 60)
    again = sample_validation(split_data(catalog(400, 3), seed=7, val_fraction=0.5), 60)
    other_seed = sample_validation(split_data(catalog(400, 3), seed=8, val_fraction=0.5), 60)
    assert [i.content_hash for i in small.val] == [i.content_hash for i in again.val]
    assert {i.label for i in small.val} != {i.label for i in other_seed.val}
    # A larger catalog with the same seed: the products sampled before that still rank
    # first are kept (each product's place is its own hash).
    grown = sample_validation(split_data(catalog(800, 3), seed=7, val_fraction=0.5), 60)
    assert len({i.label for i in small.val} & {i.label for i in grown.val}) >= 5


def test_a_validation_side_within_the_bound_is_left_whole() -> None:
    split = split_data(catalog(20, 2), seed=0, val_fraction=0.5)
    assert sample_validation(split, 1000) is split
    assert "val_sample" not in split.record
    with pytest.raises(ValueError, match="max_images"):
        sample_validation(split, 0)


def test_the_setting_is_validated() -> None:
    assert load_settings(env={}).val_sample_images == 20_000
    assert load_settings(env={"SEARCHSVC_VAL_SAMPLE_IMAGES": "500"}).val_sample_images == 500
    with pytest.raises(ConfigError, match="SEARCHSVC_VAL_SAMPLE_IMAGES"):
        load_settings(env={"SEARCHSVC_VAL_SAMPLE_IMAGES": "0"})
