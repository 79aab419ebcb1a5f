"""The composition root: builds the DB, index, models and dispatcher from one Settings.

Embedded and cluster deployments differ only in the settings given here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import func, select

from searchsvc.core.config import Settings
from searchsvc.index import VectorIndex, open_index
from searchsvc.jobs.dispatch import CeleryDispatcher, Dispatcher, InProcessDispatcher
from searchsvc.jobs.ingest import IngestCoordinator, IngestSummary, ProgressCallback
from searchsvc.jobs.model_store import ModelCache, ensure_active_embedder
from searchsvc.jobs.tasks import TaskContext, task_functions
from searchsvc.models.embedder import embedder_dim
from searchsvc.models.runtime import select_device
from searchsvc.serving.rerank_stage import StirRerankStage
from searchsvc.serving.search import RerankStage, SearchService
from searchsvc.storage.db import Database, Image, IngestRun, ModelKind, ModelVersion, Product
from searchsvc.storage.pixels import PixelStore


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.db = Database(settings.sqlalchemy_url)
        self.models = ModelCache(settings, self.db)
        self.pixels = PixelStore(settings.media_dir)
        self._index: VectorIndex | None = None
        self._dispatcher: Dispatcher | None = None

    @property
    def index(self) -> VectorIndex:
        if self._index is None:
            self._index = open_index(self.settings, "read")
        return self._index

    def _index_for_writing(self) -> VectorIndex:
        """The index, waiting for another writer (an ingest) to release an embedded store."""
        if self._index is None:
            self._index = open_index(self.settings, "write")
        return self._index

    def task_context(self) -> TaskContext:
        return TaskContext(
            settings=self.settings,
            db=self.db,
            models=self.models,
            pixels=self.pixels,
            index_factory=lambda: self.index,
        )

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            if self.settings.broker_url:
                celery = CeleryDispatcher(
                    self.settings.broker_url,
                    self.settings.result_backend_url,
                    visibility_timeout_s=self.settings.task_visibility_timeout_s,
                )
                celery.check_broker()
                self._dispatcher = celery
            else:
                # One more task thread than cores: a task decodes while others compute.
                self._dispatcher = InProcessDispatcher(
                    task_functions(self.task_context()), threads=(os.cpu_count() or 1) + 1
                )
        return self._dispatcher

    def ingest(
        self, root: Path, *, sync: bool = False, progress: ProgressCallback | None = None
    ) -> IngestSummary:
        index = self._index_for_writing()
        version = ensure_active_embedder(self.db, self.settings)
        coordinator = IngestCoordinator(
            self.settings,
            self.db,
            index,
            self.dispatcher,
            version,
            embedder_dim(version.file),
            max_in_flight=self.settings.ingest_tasks_in_flight,
        )
        if self.settings.broker_url or select_device(self.settings.device).type != "cpu":
            return coordinator.run(root, sync=sync, progress=progress)
        # In-process on a CPU, several single-threaded forwards side by side (one per task
        # thread) beat one forward spread over every core at ingest's batch sizes: measured
        # here, 2 cores, small profile: ~570 images/s against ~500. Queries keep all threads.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return coordinator.run(root, sync=sync, progress=progress)
        finally:
            torch.set_num_threads(threads)

    def search_service(self, rerank_stage: RerankStage | None = None) -> SearchService:
        return SearchService(
            self.settings,
            self.db,
            self.index,
            self.models,
            rerank_stage or StirRerankStage(self.settings, self.db, lambda: self.dispatcher),
        )

    def status(self) -> dict[str, Any]:
        with self.db.session() as session:
            products = session.scalar(
                select(func.count()).select_from(Product).where(Product.removed.is_(False))
            )
            images = dict(
                session.execute(select(Image.status, func.count()).group_by(Image.status)).all()
            )
            models = [
                {
                    "id": row.id,
                    "kind": row.kind.value,
                    "arch": row.arch,
                    "file": row.file,
                    "collection": row.collection,
                    "metrics": row.metrics,
                    "promoted_at": row.promoted_at.isoformat() if row.promoted_at else None,
                }
                for row in session.scalars(
                    select(ModelVersion).where(ModelVersion.active.is_(True))
                )
            ]
            last_run = session.scalars(select(IngestRun).order_by(IngestRun.id.desc())).first()
            last = (
                {
                    "id": last_run.id,
                    "catalog": last_run.catalog_path,
                    "status": last_run.status,
                    "counts": last_run.counts,
                }
                if last_run
                else None
            )
        collection = self.index.resolve_alias(self.settings.collection_alias)
        return {
            "products": int(products or 0),
            "images": {str(getattr(k, "value", k)): int(v) for k, v in images.items()},
            "indexed_points": self.index.count(collection) if collection else 0,
            "collection": collection,
            "active_models": models,
            "active_embedder": next(
                (m["id"] for m in models if m["kind"] == ModelKind.EMBEDDER.value), None
            ),
            "last_ingest": last,
            "locations": self.settings.describe(),
        }

    def close(self) -> None:
        self.models.close()
        if self._dispatcher is not None:
            self._dispatcher.close()
        if self._index is not None:
            self._index.close()
        self.pixels.close()
        self.db.dispose()
