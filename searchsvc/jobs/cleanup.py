"""``searchsvc cleanup``: what no reader needs any more, found and (with ``apply``) removed.

Four kinds, each reported with a count and the bytes it frees:

- ``collections``: vector collections of embedder versions older than the previous one.
  The serving collection and the one served before it (a rollback target) stay, and so
  does whatever the alias names, whichever version it is;
- ``pixels``: pixel store rows whose content hash no image row references (an image
  replaced by a new file, a catalog folder removed from the DB);
- ``retrain_runs``: folders of finished retrain runs (``home/retrain/run-*`` whose
  ``run.json`` says ``finished``); a run that did not finish keeps its folder to resume;
- ``query_photos``: logged query photos older than ``SEARCHSVC_QUERY_RETENTION_DAYS``
  (0, the default: kept for ever). The log row stays, without its photo; a photo file
  that a younger log row also names stays.

Every pass streams: keys and rows a page at a time, never a whole-catalog list.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from searchsvc.core.config import Settings
from searchsvc.index import VectorIndex
from searchsvc.storage.db import Database, Image, ModelKind, ModelVersion, QueryLog, utcnow
from searchsvc.storage.pixels import PixelStore

PAGE = 1000
KINDS = ("collections", "pixels", "retrain_runs", "query_photos")


@dataclass
class Removal:
    """One kind's findings: how many, how many bytes (where known), a few names."""

    count: int = 0
    bytes: int = 0
    examples: list[str] = field(default_factory=list)
    note: str = ""

    def add(self, name: str, nbytes: int) -> None:
        self.count += 1
        self.bytes += nbytes
        if len(self.examples) < 5:
            self.examples.append(name)


@dataclass
class CleanupReport:
    applied: bool
    kinds: dict[str, Removal] = field(default_factory=lambda: {k: Removal() for k in KINDS})

    def to_json(self) -> dict[str, Any]:
        return {"applied": self.applied, **{k: asdict(v) for k, v in self.kinds.items()}}

    def lines(self) -> list[str]:
        verb = "removed" if self.applied else "would remove (dry run; --apply removes)"
        out = []
        for kind, found in self.kinds.items():
            size = f", {found.bytes / 1e6:.1f} MB" if found.bytes else ""
            note = f" ({found.note})" if found.note else ""
            out.append(f"{kind}: {verb} {found.count}{size}{note}")
        return out


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def stale_collections(db: Database, index: VectorIndex, alias: str) -> list[str]:
    """Collections of embedder versions older than the previous one (by promotion time),
    among those the index holds."""
    with db.session() as session:
        rows = session.execute(
            select(ModelVersion.id, ModelVersion.collection, ModelVersion.promoted_at)
            .where(ModelVersion.kind == ModelKind.EMBEDDER, ModelVersion.collection.is_not(None))
            .order_by(ModelVersion.id)
        ).all()
    promoted = sorted(
        (r for r in rows if r.promoted_at is not None), key=lambda r: (r.promoted_at, r.id)
    )
    keep = {r.collection for r in promoted[-2:]}  # serving now, and served before it
    keep.add(index.resolve_alias(alias))
    newest_kept = max((r.id for r in promoted[-2:]), default=0)
    present = set(index.collections())
    # Versions newer than the kept ones (a candidate being switched to) are not "older".
    return [
        str(r.collection)
        for r in rows
        if r.collection in present and r.collection not in keep and r.id < newest_kept
    ]


def _hash_pages(pixels: PixelStore) -> Iterator[dict[str, int]]:
    """The store's rows a page at a time: content hash -> bytes (all sizes together)."""
    page: dict[str, int] = {}
    for key in pixels.keys():
        page[key.content_hash] = page.get(key.content_hash, 0) + key.nbytes
        if len(page) >= PAGE:
            yield page
            page = {}
    if page:
        yield page


def orphaned_pixels(db: Database, pixels: PixelStore) -> Iterator[tuple[str, int]]:
    """(content hash, bytes) of stored pixels no image row references."""
    for page in _hash_pages(pixels):
        with db.session() as session:
            referenced = set(
                session.scalars(
                    select(Image.content_hash).where(Image.content_hash.in_(list(page))).distinct()
                ).all()
            )
        for digest, nbytes in page.items():
            if digest not in referenced:
                yield digest, nbytes


def finished_runs(home: Path) -> list[Path]:
    runs = []
    for state in sorted((home / "retrain").glob("run-*/run.json")):
        try:
            finished = bool(json.loads(state.read_text(encoding="utf-8")).get("finished"))
        except (OSError, ValueError):
            continue  # unreadable: not ours to judge
        if finished:
            runs.append(state.parent)
    return runs


def _old_photos(db: Database, cutoff: dt.datetime) -> Iterator[list[tuple[str, str]]]:
    """Pages of (query id, photo path) of log rows older than ``cutoff`` with a photo."""
    last = ""
    while True:
        with db.session() as session:
            rows = session.execute(
                select(QueryLog.id, QueryLog.image_path)
                .where(
                    QueryLog.id > last,
                    QueryLog.created_at < cutoff,
                    QueryLog.image_path.is_not(None),
                )
                .order_by(QueryLog.id)
                .limit(PAGE)
            ).all()
        if not rows:
            return
        last = rows[-1][0]
        yield [(str(r[0]), str(r[1])) for r in rows]


def cleanup(
    settings: Settings,
    db: Database,
    pixels: PixelStore,
    index: Callable[[], VectorIndex] | None,
    *,
    apply: bool = False,
    now: dt.datetime | None = None,
) -> CleanupReport:
    """Find (and with ``apply`` remove) what no reader needs; ``index`` opens the vector
    index (None: collections are not looked at, e.g. when another process holds it)."""
    report = CleanupReport(applied=apply)

    found = report.kinds["collections"]
    if index is None:
        found.note = "index not opened"
    else:
        vectors = index()
        for name in stale_collections(db, vectors, settings.collection_alias):
            # Bytes are known for the embedded store (a folder per collection), not a server.
            nbytes = 0 if settings.qdrant_url else _folder_bytes(settings.qdrant_path / name)
            found.add(f"{name} ({vectors.count(name)} points)", nbytes)
            if apply:
                vectors.drop_collection(name)

    found = report.kinds["pixels"]
    orphans: list[str] = []
    for digest, nbytes in orphaned_pixels(db, pixels):
        found.add(digest, nbytes)
        if apply:
            orphans.append(digest)
            if len(orphans) >= PAGE:
                pixels.delete(orphans)
                orphans.clear()
    if apply and orphans:
        pixels.delete(orphans)

    found = report.kinds["retrain_runs"]
    for run in finished_runs(settings.home):
        found.add(run.name, _folder_bytes(run))
        if apply:
            shutil.rmtree(run, ignore_errors=True)

    found = report.kinds["query_photos"]
    if settings.query_retention_days <= 0:
        found.note = "SEARCHSVC_QUERY_RETENTION_DAYS is 0: kept"
    else:
        cutoff = (now or utcnow()) - dt.timedelta(days=settings.query_retention_days)
        photos_root = settings.query_images_dir.resolve()
        for page in _old_photos(db, cutoff):
            paths = {path for _, path in page}
            with db.session() as session:
                still_named = set(
                    session.scalars(
                        select(QueryLog.image_path).where(
                            QueryLog.image_path.in_(list(paths)), QueryLog.created_at >= cutoff
                        )
                    ).all()
                )
            for path in sorted(paths - still_named):
                file = Path(path)
                inside = file.resolve().is_relative_to(photos_root)
                if inside and file.is_file():
                    found.add(file.name, file.stat().st_size)
                    if apply:
                        file.unlink(missing_ok=True)
            if apply:
                with db.session() as session:
                    session.execute(
                        update(QueryLog)
                        .where(
                            QueryLog.id.in_([qid for qid, path in page if path not in still_named])
                        )
                        .values(image_path=None)
                    )
    return report
