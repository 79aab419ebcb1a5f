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
import errno
import json
import math
import os
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchsvc.core.errors import CatalogError
from searchsvc.core.images import IMAGE_SUFFIXES

METADATA_FILES = ("products.csv", "products.jsonl")
KNOWN_COLUMNS = ("title", "category", "price", "url")
MAX_PRODUCT_ID_LENGTH = 255  # products.id is VARCHAR(255)
# Limits of one metadata row, inside what the database holds on SQLite and PostgreSQL alike
# (products.category is VARCHAR(255); title and url are TEXT, attributes JSON): a row past
# them is named and skipped, never allowed to fail the batch it is written in.
MAX_TEXT_LENGTH = {"title": 4096, "category": 255, "url": 4096}
MAX_ATTRIBUTES_CHARS = 65_536
MAX_ATTRIBUTES_DEPTH = 16
MAX_FILENAME_LENGTH = 512  # images.filename is VARCHAR(512)


@dataclass(frozen=True)
class ProductRecord:
    product_id: str
    title: str | None = None
    category: str | None = None
    price: float | None = None
    url: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    where: str = field(default="", compare=False)
    """The row it came from (``products.csv line 7``), to name it if the database refuses it."""


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


def printable(name: str) -> str:
    """``name`` safe to print and store: bytes that were not UTF-8 (a file name read with
    ``surrogateescape``) as ``\\xff``, control characters as ``\\x1b``."""
    try:
        text = os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeError:  # a lone surrogate that did not come from a file name
        text = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(f"\\x{ord(ch):02x}" if unicodedata.category(ch) == "Cc" else ch for ch in text)


def _text_problem(value: str) -> str | None:
    """Why a text cannot be stored as it is (PostgreSQL refuses both), or None."""
    if "\x00" in value:
        return "contains a NUL character"
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        return "is not valid UTF-8"
    return None


def check_product_id(product_id: str) -> str | None:
    """The reason ``product_id`` is unusable, or None when it is fine."""
    if not product_id or not product_id.strip():
        return "empty product_id"
    if product_id != product_id.strip():
        return "product_id has leading or trailing spaces"
    if len(product_id) > MAX_PRODUCT_ID_LENGTH:
        return f"product_id longer than {MAX_PRODUCT_ID_LENGTH} characters"
    if _text_problem(product_id) == "is not valid UTF-8":
        return "product_id is not valid UTF-8"
    if any(unicodedata.category(ch) == "Cc" for ch in product_id) or "/" in product_id:
        return "product_id contains control characters or '/'"
    return None


def check_filename(name: str) -> str | None:
    """The reason an image file name cannot be registered, or None when it is fine."""
    if len(name) > MAX_FILENAME_LENGTH:
        return f"file name longer than {MAX_FILENAME_LENGTH} characters"
    if _text_problem(name) == "is not valid UTF-8":
        return "file name is not valid UTF-8"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "file name contains control characters"
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


def iter_metadata(
    root: Path, *, follow_outside: bool = False
) -> Iterator[ProductRecord | CatalogProblem]:
    """Rows of the metadata file (if any), one at a time. A metadata file that is a link
    out of the catalog is not read unless ``follow_outside`` (as for images)."""
    path = metadata_file(root)
    if path is None:
        return
    real_root = os.path.realpath(root)
    target = os.path.realpath(path)
    if not follow_outside and os.path.commonpath([target, real_root]) != real_root:
        yield CatalogProblem(
            path.name,
            "symbolic link to a file outside the catalog; not read "
            "(SEARCHSVC_FOLLOW_SYMLINKS_OUTSIDE_CATALOG=true allows it)",
        )
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
        first_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield CatalogProblem(f"{path.name} line {reader.line_num}", f"malformed CSV ({exc})")
            continue
        if not row:
            continue
        # A quoted field may span lines: name them all, so the row can be found.
        lines = (
            f"line {first_line}"
            if first_line >= reader.line_num
            else f"lines {first_line}-{reader.line_num}"
        )
        where = f"{path.name} {lines}"
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
        except RecursionError:
            yield CatalogProblem(where, "JSON nested too deeply to parse")
            continue
        except ValueError as exc:  # an integer of more digits than Python converts
            yield CatalogProblem(where, f"invalid JSON ({exc})")
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
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"'{name}' must be text")
        value = str(value)
        problem = _text_problem(value)
        if problem:
            raise ValueError(f"'{name}' {problem}")
        if len(value) > MAX_TEXT_LENGTH[name]:
            raise ValueError(f"'{name}' is longer than {MAX_TEXT_LENGTH[name]} characters")
        if name != "title" and any(unicodedata.category(ch) == "Cc" for ch in value):
            raise ValueError(f"'{name}' contains line breaks or control characters")
        return value

    try:
        price = _parse_price(data.get("price"))
        attributes = {
            key: value
            for key, value in data.items()
            if key not in KNOWN_COLUMNS and key != "product_id"
        }
        _check_attributes(attributes)
        record = ProductRecord(
            product_id=product_id,
            title=text("title"),
            category=text("category"),
            price=price,
            url=text("url"),
            attributes=attributes,
            where=where,
        )
    except ValueError as exc:
        return CatalogProblem(where, str(exc))
    return record


def _check_attributes(attributes: dict[str, Any]) -> None:
    """Raise ValueError when the extra columns cannot be stored as JSON in every database."""

    def walk(value: Any, depth: int, name: str) -> None:
        if depth > MAX_ATTRIBUTES_DEPTH:
            raise ValueError(f"'{name}' is nested deeper than {MAX_ATTRIBUTES_DEPTH} levels")
        if isinstance(value, str):
            problem = _text_problem(value)
            if problem:
                raise ValueError(f"'{name}' {problem}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"'{name}' is not a finite number")
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(key, depth, name)
                walk(item, depth + 1, name)
        elif isinstance(value, list):
            for item in value:
                walk(item, depth + 1, name)

    for key, value in attributes.items():
        walk(key, 0, printable(key))
        walk(value, 1, printable(key))
    try:
        size = len(json.dumps(attributes))
    except ValueError as exc:  # an integer too long to write back out
        raise ValueError(f"extra columns cannot be stored ({exc})") from None
    if size > MAX_ATTRIBUTES_CHARS:
        raise ValueError(
            f"extra columns take {size} characters as JSON, over {MAX_ATTRIBUTES_CHARS}"
        )


def _parse_price(raw: Any) -> float | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None  # an empty cell, as for the text columns
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"'price' must be a number, got {raw!r}")
    try:
        price = float(raw)
    except ValueError:
        raise ValueError(f"'price' is not a number: {_clip(repr(raw))}") from None
    except OverflowError:  # an integer too large for a float
        raise ValueError(f"'price' is too large: {_clip(repr(raw))}") from None
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"'price' must be a finite non-negative number, got {_clip(repr(raw))}")
    return price


def _clip(text: str, limit: int = 60) -> str:
    """A value quoted in a message: a 5,000-digit number must not flood the summary."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def iter_images(
    root: Path, *, follow_outside: bool = False
) -> Iterator[CatalogImage | CatalogProblem]:
    """Every image of every product folder. Folder order is the file system's (streamed);
    files inside a folder are sorted, so a product's images always come in the same order.

    Only directories and regular files are taken: a pipe, a device or a socket is named and
    never opened (opening a pipe blocks). A symbolic link is followed when its target is
    inside the catalog (or anywhere, with ``follow_outside``); one that dangles, loops or
    leaves the catalog is named and not read.
    """
    real_root = os.path.realpath(root)
    try:
        top = os.scandir(root)
    except OSError as exc:
        raise CatalogError(f"{root}: cannot list catalog ({exc.strerror or exc})") from None
    with top:
        for entry in top:
            name = entry.name
            if name.startswith("."):
                continue
            kind, problem = _entry_kind(entry, real_root, follow_outside)
            if problem:
                yield CatalogProblem(printable(name), problem)
                continue
            if kind != "dir":
                if name not in METADATA_FILES:
                    yield CatalogProblem(
                        printable(name), "file at the catalog root is not a product"
                    )
                continue
            problem = check_product_id(name)
            if problem:
                yield CatalogProblem(printable(name), problem)
                continue
            yield from _iter_product_folder(name, Path(entry.path), real_root, follow_outside)


def _iter_product_folder(
    product_id: str, folder: Path, real_root: str, follow_outside: bool
) -> Iterator[CatalogImage | CatalogProblem]:
    # scandir, not listdir + is_dir: the entry's type comes with the listing on most file
    # systems, so a folder of images costs no stat per file (links and odd types cost one).
    try:
        with os.scandir(folder) as listing:
            entries = sorted(
                (e.name, _entry_kind(e, real_root, follow_outside))
                for e in listing
                if not e.name.startswith(".")
            )
    except OSError as exc:
        yield UnlistedFolder(
            f"{product_id}/", f"cannot list folder ({exc.strerror or exc})", product_id
        )
        return
    for name, (kind, problem) in entries:
        item = f"{product_id}/{printable(name)}"
        suffix = os.path.splitext(name)[1]
        if problem:
            yield CatalogProblem(item, problem)
        elif kind == "dir":
            yield CatalogProblem(item, "sub-folders inside a product folder are not read")
        elif suffix.lower() not in IMAGE_SUFFIXES:
            yield CatalogProblem(
                item, f"not an image file (suffix {printable(suffix) or 'none'!r})"
            )
        elif problem := check_filename(name):
            yield CatalogProblem(item, problem)
        else:
            yield CatalogImage(product_id=product_id, filename=name, path=folder / name)


_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _entry_kind(
    entry: os.DirEntry[str], real_root: str, follow_outside: bool
) -> tuple[str | None, str | None]:
    """``("dir" | "file", None)`` for what the catalog reads, else ``(None, reason)``."""
    try:
        if entry.is_symlink():
            try:
                info = os.stat(entry.path)  # follows the link
            except FileNotFoundError:
                return None, "dangling symbolic link (its target does not exist); not read"
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    return None, "symbolic link loop; not read"
                return None, f"cannot follow symbolic link ({exc.strerror or exc}); not read"
            target = os.path.realpath(entry.path)
            if not follow_outside and os.path.commonpath([target, real_root]) != real_root:
                return None, (
                    "symbolic link to a file outside the catalog; not read "
                    "(SEARCHSVC_FOLLOW_SYMLINKS_OUTSIDE_CATALOG=true allows it)"
                )
            mode = info.st_mode
        elif entry.is_dir(follow_symlinks=False):
            return "dir", None
        elif entry.is_file(follow_symlinks=False):
            return "file", None
        else:
            mode = entry.stat(follow_symlinks=False).st_mode
    except OSError as exc:
        return None, f"cannot inspect ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "dir", None
    if stat.S_ISREG(mode):
        return "file", None
    what = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return None, f"{what}, not a regular file; not opened"


def count_image_files(root: Path, *, follow_outside: bool = False) -> int:
    """How many image files the catalog holds (a listing pass, for progress bars): the
    same choices as :func:`iter_images`, so that a progress bar ends at its total."""
    try:
        return sum(
            1
            for item in iter_images(root, follow_outside=follow_outside)
            if isinstance(item, CatalogImage)
        )
    except CatalogError:
        return 0
