"""Embed deliveries that started and never finished, counted per image in the database.

Embed tasks are acknowledged after they ran, and one whose worker died goes back to the
queue (``task_reject_on_worker_lost``); the coordinator also resends a task without a
result. So an image that kills its worker (out of memory, a segfault in a decoder) would be
delivered forever, taking its batch-mates with it. Each delivery is counted against its
images before the work starts and cleared when it ends; a batch that arrives with a count
left over (an earlier delivery died) is done one image at a time, each counted alone, so
that only the image under way when a worker dies accumulates deliveries. One that reaches
``embed_max_deliveries`` is recorded as failed, with the reason, and skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, select, update

from searchsvc.jobs.wire import EmbedItem
from searchsvc.storage.db import Database, Image, ImageStatus
from searchsvc.storage.db.schema import utcnow


class DeliveryLedger:
    def __init__(self, db: Database, max_deliveries: int) -> None:
        self.db = db
        self.max_deliveries = max_deliveries

    def unfinished(self, items: Sequence[EmbedItem]) -> dict[int, int]:
        """Image id -> deliveries of its current bytes that never finished (0 when none)."""
        hashes = {item.image_id: item.content_hash for item in items}
        with self.db.session() as session:
            found = session.execute(
                select(Image.id, Image.content_hash, Image.embed_deliveries).where(
                    Image.id.in_(hashes)
                )
            )
            return {
                image_id: int(count or 0)
                for image_id, digest, count in found
                if hashes[image_id] == digest
            }

    def started(self, items: Sequence[EmbedItem]) -> None:
        self._set(items, Image.embed_deliveries + 1)

    def finished(self, items: Sequence[EmbedItem]) -> None:
        self._set(items, 0)

    def give_up(self, item: EmbedItem, deliveries: int) -> str:
        """Record ``item`` as failed; returns the reason."""
        reason = (
            f"given up after {deliveries} embed deliveries that never finished: the worker "
            "died while embedding it (out of memory or a crash in the decoder?)"
        )
        with self.db.session() as session:
            session.execute(
                update(Image)
                .where(Image.id == item.image_id, Image.content_hash == item.content_hash)
                .values(status=ImageStatus.FAILED, error=reason, updated_at=utcnow())
            )
        return reason

    def _set(self, items: Sequence[EmbedItem], value: object) -> None:
        if not items:
            return
        with self.db.session() as session:
            session.connection().execute(
                update(Image)
                .where(Image.id == bindparam("b_id"), Image.content_hash == bindparam("b_hash"))
                .values(embed_deliveries=value),
                [{"b_id": item.image_id, "b_hash": item.content_hash} for item in items],
            )
