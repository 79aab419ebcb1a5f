"""Reading a catalog directory, streamed: memory stays flat however many products it holds.

Layout::

    catalog/
      products.csv | products.jsonl   optional metadata: product_id + title, category,
                                      price, url; any other column goes to ``attributes``
      <product_id>/                   one folder per product, holding its images
        front.jpg, side.png, ...

Readers yield either a record or a :class:`CatalogProblem` (the item and the reason), so one
bad row or file never stops the rest.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchsvc.core.errors import CatalogError
from searchsvc.core.images import IMAGE_SUFFIXES

METADATA_FILES = ("products.csv", "products.jsonl")
KNOWN_COLUMNS = ("title", "category", "price", "url")
MAX_PRODUCT_ID_LENGTH = 255


@dataclass(frozen=True)
class ProductRecord:
    product_id: str
    title: str | None = None
    category: str | None = None
    price: float | None = None
    url: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CatalogImage:
    product_id: str
    filename: str
    path: Path


@dataclass(frozen=True)
class CatalogProblem:
    item: str
    reason: str

    def __str__(self) -> str:
        return f"{self.item}: {self.reason}"


@dataclass(frozen=True)
class UnlistedFolder(CatalogProblem):
    """A product folder that is there but could not be listed: its images are unknown, not
    gone, so ``--sync`` keeps its rows."""

    product_id: str = ""


def check_product_id(product_id: str) -> str | None:
    """The reason ``product_id`` is unusable, or None when it is fine."""
    if not product_id or not product_id.strip():
        return "empty product_id"
    if product_id != product_id.strip():
        return "product_id has leading or trailing spaces"
    if len(product_id) > MAX_PRODUCT_ID_LENGTH:
        return f"product_id longer than {MAX_PRODUCT_ID_LENGTH} characters"
    if any(ord(ch) < 32 for ch in product_id) or "/" in product_id:
        return "product_id contains control characters or '/'"
    return None


def open_catalog(root: Path) -> Path:
    """Check the catalog root once, with a one-line error when it cannot be used."""
    if not root.exists():
        raise CatalogError(f"{root}: catalog directory not found")
    if not root.is_dir():
        raise CatalogError(f"{root}: not a directory (a catalog is a folder of product folders)")
    present = [name for name in METADATA_FILES if (root / name).is_file()]
    if len(present) > 1:
        raise CatalogError(f"{root}: has both {' and '.join(present)}; keep one metadata file")
    return root


def metadata_file(root: Path) -> Path | None:
    for name in METADATA_FILES:
        if (root / name).is_file():
            return root / name
    return None


def iter_metadata(root: Path) -> Iterator[ProductRecord | CatalogProblem]:
    """Rows of the metadata file (if any), one at a time."""
    path = metadata_file(root)
    if path is None:
        return
    try:
        # utf-8-sig: spreadsheet exports start with a byte-order mark, which would otherwise
        # stick to the first column name ("\ufeffproduct_id") and hide the header.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if path.suffix == ".csv":
                yield from _iter_csv(path, handle)
            else:
                yield from _iter_jsonl(path, handle)
    except UnicodeDecodeError as exc:
        yield CatalogProblem(path.name, f"not UTF-8 text ({exc.reason}); rest of file skipped")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read metadata ({exc.strerror or exc})") from None


def _iter_csv(path: Path, handle: Any) -> Iterator[ProductRecord | CatalogProblem]:
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        yield CatalogProblem(f"{path.name} line 1", f"malformed header ({exc})")
        return
    header = [name.strip() for name in header]
    if "product_id" not in header:
        yield CatalogProblem(f"{path.name} line 1", "header has no 'product_id' column")
        return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield CatalogProblem(f"{path.name} line {reader.line_num}", f"malformed CSV ({exc})")
            continue
        if not row:
            continue
        where = f"{path.name} line {reader.line_num}"
        if len(row) != len(header):
            yield CatalogProblem(where, f"has {len(row)} fields, the header has {len(header)}")
            continue
        yield _record(dict(zip(header, row, strict=True)), where)


def _iter_jsonl(path: Path, handle: Any) -> Iterator[ProductRecord | CatalogProblem]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield CatalogProblem(where, f"invalid JSON ({exc.msg})")
            continue
        if not isinstance(data, dict):
            yield CatalogProblem(where, "a line must be a JSON object")
            continue
        yield _record(data, where)


def _record(data: dict[str, Any], where: str) -> ProductRecord | CatalogProblem:
    raw_id = data.get("product_id")
    # bool is an int: {"product_id": true} must not become the product "True".
    is_id = isinstance(raw_id, str | int) and not isinstance(raw_id, bool)
    product_id = str(raw_id) if is_id else ""
    problem = check_product_id(product_id)
    if problem:
        return CatalogProblem(where, problem)

    def text(name: str) -> str | None:
        value = data.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str | int | float):
            raise ValueError(f"'{name}' must be text")
        return str(value)

    try:
        price = _parse_price(data.get("price"))
        record = ProductRecord(
            product_id=product_id,
            title=text("title"),
            category=text("category"),
            price=price,
            url=text("url"),
            attributes={
                key: value
                for key, value in data.items()
                if key not in KNOWN_COLUMNS and key != "product_id"
            },
        )
    except ValueError as exc:
        return CatalogProblem(where, str(exc))
    return record


def _parse_price(raw: Any) -> float | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None  # an empty cell, as for the text columns
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"'price' must be a number, got {raw!r}")
    try:
        price = float(raw)
    except ValueError:
        raise ValueError(f"'price' is not a number: {raw!r}") from None
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"'price' must be a finite non-negative number, got {raw!r}")
    return price


def iter_images(root: Path) -> Iterator[CatalogImage | CatalogProblem]:
    """Every image of every product folder. Folder order is the file system's (streamed);
    files inside a folder are sorted, so a product's images always come in the same order."""
    try:
        top = os.scandir(root)
    except OSError as exc:
        raise CatalogError(f"{root}: cannot list catalog ({exc.strerror or exc})") from None
    with top:
        for entry in top:
            if entry.name.startswith("."):
                continue
            if not entry.is_dir(follow_symlinks=True):
                if entry.name not in METADATA_FILES:
                    yield CatalogProblem(entry.name, "file at the catalog root is not a product")
                continue
            problem = check_product_id(entry.name)
            if problem:
                yield CatalogProblem(entry.name, problem)
                continue
            yield from _iter_product_folder(entry.name, Path(entry.path))


def _iter_product_folder(product_id: str, folder: Path) -> Iterator[CatalogImage | CatalogProblem]:
    # scandir, not listdir + is_dir: the entry's type comes with the listing on most file
    # systems, so a folder of images costs no stat per file.
    try:
        with os.scandir(folder) as listing:
            entries = sorted(
                (e.name, e.is_dir(follow_symlinks=True))
                for e in listing
                if not e.name.startswith(".")
            )
    except OSError as exc:
        yield UnlistedFolder(
            f"{product_id}/", f"cannot list folder ({exc.strerror or exc})", product_id
        )
        return
    for name, is_dir in entries:
        item = f"{product_id}/{name}"
        suffix = os.path.splitext(name)[1]
        if is_dir:
            yield CatalogProblem(item, "sub-folders inside a product folder are not read")
        elif suffix.lower() not in IMAGE_SUFFIXES:
            yield CatalogProblem(item, f"not an image file (suffix {suffix or 'none'!r})")
        else:
            yield CatalogImage(product_id=product_id, filename=name, path=folder / name)


def count_image_files(root: Path) -> int:
    """How many image files the catalog holds (a cheap listing pass, for progress bars)."""
    total = 0
    with os.scandir(root) as top:
        for entry in top:
            # The same choices as iter_images, so that a progress bar ends at its total.
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=True):
                continue
            if check_product_id(entry.name):
                continue
            try:
                with os.scandir(entry.path) as files:
                    total += sum(
                        1
                        for f in files
                        if not f.name.startswith(".")
                        and os.path.splitext(f.name)[1].lower() in IMAGE_SUFFIXES
                        and not f.is_dir(follow_symlinks=True)
                    )
            except OSError:
                continue
    return total
