"""What a real file share puts in a catalog: malformed metadata, names that are not UTF-8,
pipes, devices and symbolic links. Each is named with its line or path; the rest comes
through (issue 17)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from searchsvc.core.errors import ImageError
from searchsvc.core.images import read_image_bytes
from searchsvc.storage.catalog import (
    CatalogImage,
    CatalogProblem,
    ProductRecord,
    count_image_files,
    iter_images,
    iter_metadata,
    printable,
)


def jsonl(root: Path, lines: list[str]) -> tuple[list[ProductRecord], dict[str, str]]:
    (root / "products.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return split(list(iter_metadata(root)))


def split(items: list) -> tuple[list, dict[str, str]]:  # type: ignore[type-arg]
    good = [i for i in items if not isinstance(i, CatalogProblem)]
    return good, {p.item: p.reason for p in items if isinstance(p, CatalogProblem)}


# ------------------------------------------------------------------------ metadata


def test_numbers_too_long_to_parse_are_named_and_the_rest_come_through(tmp_path: Path) -> None:
    good, problems = jsonl(
        tmp_path,
        [
            '{"product_id": "a"}',
            '{"product_id": "b", "price": ' + "9" * 5000 + "}",  # over Python's int limit
            '{"product_id": "c", "price": ' + "9" * 400 + "}",  # an int, too big for a float
            '{"product_id": "d", "price": 1e999}',  # parses to inf
            '{"product_id": "e", "stock": ' + "7" * 5000 + "}",
            '{"product_id": "f", "price": 3}',
        ],
    )
    assert [r.product_id for r in good] == ["a", "f"]
    assert set(problems) == {f"products.jsonl line {n}" for n in (2, 3, 4, 5)}
    assert "invalid JSON" in problems["products.jsonl line 2"]
    assert "too large" in problems["products.jsonl line 3"]
    assert len(problems["products.jsonl line 3"]) < 200  # the number is not echoed whole
    assert "finite" in problems["products.jsonl line 4"]


def test_csv_number_too_long_is_named(tmp_path: Path) -> None:
    (tmp_path / "products.csv").write_text(
        "product_id,price\na,1\nb," + "9" * 5000 + "\nc,2\n", encoding="utf-8"
    )
    good, problems = split(list(iter_metadata(tmp_path)))
    assert [r.product_id for r in good] == ["a", "c"]
    assert "finite" in problems["products.csv line 3"]


def test_deep_nesting_is_named_and_the_rest_come_through(tmp_path: Path) -> None:
    deep_array = "[" * 200_000 + "]" * 200_000
    deep_attribute = json.dumps({"product_id": "c", "spec": _nested(40)})
    good, problems = jsonl(
        tmp_path,
        [
            '{"product_id": "a", "spec": {"size": [1, 2]}}',
            '{"product_id": "b", "spec": ' + deep_array + "}",
            deep_attribute,
            '{"product_id": "d"}',
        ],
    )
    assert [r.product_id for r in good] == ["a", "d"]
    assert "nested too deeply" in problems["products.jsonl line 2"]
    assert "nested deeper than 16" in problems["products.jsonl line 3"]


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"x": value}
    return value


def test_nul_bytes_and_lone_surrogates_are_named(tmp_path: Path) -> None:
    good, problems = jsonl(
        tmp_path,
        [
            '{"product_id": "a", "title": "nul\\u0000here"}',
            '{"product_id": "b", "colour": "re\\u0000d"}',
            '{"product_id": "c", "title": "half \\ud800 a pair"}',
            '{"product_id": "p\\u0000x"}',
            '{"product_id": "e", "title": "fine"}',
        ],
    )
    assert [r.product_id for r in good] == ["e"]
    assert "NUL" in problems["products.jsonl line 1"]
    assert (
        "NUL" in problems["products.jsonl line 2"] and "colour" in problems["products.jsonl line 2"]
    )
    assert "UTF-8" in problems["products.jsonl line 3"]
    assert "control characters" in problems["products.jsonl line 4"]

    (tmp_path / "products.jsonl").unlink()
    (tmp_path / "products.csv").write_text(
        "product_id,title\na,bad\x00title\nb,ok\n", encoding="utf-8"
    )
    good, problems = split(list(iter_metadata(tmp_path)))
    assert [r.product_id for r in good] == ["b"]
    assert "NUL" in problems["products.csv line 2"]


def test_over_long_fields_are_named_within_the_column_limits(tmp_path: Path) -> None:
    good, problems = jsonl(
        tmp_path,
        [
            json.dumps({"product_id": "a", "category": "c" * 255, "title": "t" * 4096}),
            json.dumps({"product_id": "b", "category": "c" * 256}),
            json.dumps({"product_id": "c", "title": "t" * 4097}),
            json.dumps({"product_id": "d", "url": "https://x/" + "u" * 5000}),
            json.dumps({"product_id": "e", "notes": "n" * 70_000}),
            json.dumps({"product_id": "f" * 256}),
        ],
    )
    assert [r.product_id for r in good] == ["a"]
    assert "'category' is longer than 255" in problems["products.jsonl line 2"]
    assert "'title' is longer than 4096" in problems["products.jsonl line 3"]
    assert "'url' is longer" in problems["products.jsonl line 4"]
    assert "extra columns" in problems["products.jsonl line 5"]
    assert "longer than 255" in problems["products.jsonl line 6"]


def test_multi_line_fields(tmp_path: Path) -> None:
    (tmp_path / "products.csv").write_text(
        "product_id,title,category\n"
        'a,"Two-line\ntitle",shoes\n'  # lines 2-3: a title may hold line breaks
        'b,Shoe,"shoes\nand more"\n'  # lines 4-5: a category may not
        "c,Plain,bags\n",  # line 6
        encoding="utf-8",
    )
    good, problems = split(list(iter_metadata(tmp_path)))
    assert [(r.product_id, r.title) for r in good] == [("a", "Two-line\ntitle"), ("c", "Plain")]
    assert good[1].where == "products.csv line 6"
    assert problems == {
        "products.csv lines 4-5": "'category' contains line breaks or control characters"
    }


# ------------------------------------------------------------------- folder names


def image(path: Path, colour: str = "red", size: tuple[int, int] = (32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def listing(root: Path, **kwargs: bool) -> tuple[set[str], dict[str, str]]:
    items = list(iter_images(root, **kwargs))
    images = {f"{i.product_id}/{i.filename}" for i in items if isinstance(i, CatalogImage)}
    return images, {p.item: p.reason for p in items if isinstance(p, CatalogProblem)}


def test_folder_and_file_names_that_are_not_utf8_or_hold_control_characters(
    tmp_path: Path,
) -> None:
    root = tmp_path / "catalog"
    image(root / "good" / "a.png")
    os.makedirs(os.fsencode(root) + b"/caf\xe9")  # Latin-1, not UTF-8
    image(Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9")) / "a.png")
    image(root / "esc\x1bape" / "a.png")
    image(root / "del\x7f" / "a.png")
    image(Path(os.fsdecode(os.fsencode(root) + b"/good/b\xff.png")))
    image(root / "good" / "bell\x07.png")

    images, problems = listing(root)
    assert images == {"good/a.png"}
    assert "not valid UTF-8" in problems["caf\\xe9"]
    assert "control characters" in problems["esc\\x1bape"]
    assert "control characters" in problems["del\\x7f"]
    assert "not valid UTF-8" in problems["good/b\\xff.png"]
    assert "control characters" in problems["good/bell\\x07.png"]
    for item in problems:
        item.encode("utf-8")  # every name is printable and storable as it is
        assert printable(item) == item
    assert count_image_files(root) == 1


# ------------------------------------------------------ pipes, devices, symbolic links


@pytest.fixture
def alarm() -> Iterator[None]:
    """Turn a blocking call into a failure after 5 s instead of a hung suite."""

    def fail(*_: object) -> None:
        raise AssertionError("blocked: a pipe was opened")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, 5)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_pipes_and_devices_are_named_and_never_opened(tmp_path: Path, alarm: None) -> None:
    root = tmp_path / "catalog"
    image(root / "p1" / "a.png")
    os.mkfifo(root / "p1" / "pipe.jpg")
    os.mkfifo(root / "pipe-product")
    os.symlink("pipe.jpg", root / "p1" / "link-to-pipe.png")
    images, problems = listing(root)
    assert images == {"p1/a.png"}
    assert "named pipe" in problems["p1/pipe.jpg"]
    assert "named pipe" in problems["p1/link-to-pipe.png"]
    assert "named pipe" in problems["pipe-product"]
    # Should one replace an image after the listing, the read refuses it without blocking.
    with pytest.raises(ImageError, match="not a regular file"):
        read_image_bytes(root / "p1" / "pipe.jpg", 1000)

    os.symlink("/dev/null", root / "p1" / "null.png")
    _, problems = listing(root)
    assert "outside the catalog" in problems["p1/null.png"]
    _, problems = listing(root, follow_outside=True)
    assert "character device" in problems["p1/null.png"]
    with pytest.raises(ImageError, match="not a regular file"):
        read_image_bytes(Path("/dev/zero"), 1000)


def test_symbolic_links_outside_looping_dangling_and_inside(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    outside = image(tmp_path / "private" / "secret.png", "blue")
    image(root / "p1" / "a.png")
    os.symlink(root / "p1" / "a.png", root / "p1" / "same-as-a.png")  # inside: fine
    os.symlink(outside, root / "p1" / "secret.png")
    os.symlink(outside.parent, root / "p2")  # a product folder that is elsewhere
    os.symlink("loop2.png", root / "p1" / "loop1.png")
    os.symlink("loop1.png", root / "p1" / "loop2.png")
    os.symlink("gone.png", root / "p1" / "dangling.png")
    (root / "products.jsonl").symlink_to(tmp_path / "private" / "products.jsonl")
    (tmp_path / "private" / "products.jsonl").write_text('{"product_id": "p1"}\n')

    images, problems = listing(root)
    assert images == {"p1/a.png", "p1/same-as-a.png"}
    assert "outside the catalog" in problems["p1/secret.png"]
    assert "outside the catalog" in problems["p2"]
    assert "loop" in problems["p1/loop1.png"] and "loop" in problems["p1/loop2.png"]
    assert "dangling" in problems["p1/dangling.png"]
    good, meta_problems = split(list(iter_metadata(root)))
    assert good == [] and "outside the catalog" in meta_problems["products.jsonl"]

    images, _ = listing(root, follow_outside=True)  # the setting allows it
    assert {"p1/secret.png", "p2/secret.png"} <= images
    assert [r.product_id for r in iter_metadata(root, follow_outside=True)] == ["p1"]  # type: ignore[union-attr]
