"""The composition root: builds the DB, index, models and dispatcher from one Settings, and
the services that take them.

Embedded and cluster deployments differ only in the settings given here. Entry points (the
CLI, the retrain, the workers, benchmarks, tests) build an :class:`App`; nothing below them
takes one: every service gets its collaborators passed in.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from searchsvc.core.config import Settings
from searchsvc.index import IndexMode, VectorIndex, open_index
from searchsvc.jobs.dispatch import (
    CeleryDispatcher,
    Dispatcher,
    InProcessDispatcher,
    check_consumers,
)
from searchsvc.jobs.ingest import DeleteLimit, IngestCoordinator, IngestSummary, ProgressCallback
from searchsvc.jobs.model_files import ensure_active_embedder
from searchsvc.jobs.switch import SwapReport, reconcile_alias, switch_embedder
from searchsvc.jobs.tasks import TaskContext, task_functions
from searchsvc.jobs.wire import EMBED_QUEUE
from searchsvc.models.cache import ModelCache
from searchsvc.models.embedder import embedder_dim
from searchsvc.models.runtime import select_device
from searchsvc.serving.rerank_stage import StirRerankStage
from searchsvc.serving.search import QueryRecorder, RerankStage, SearchService
from searchsvc.serving.status import catalog_status
from searchsvc.storage.db import Database
from searchsvc.storage.pixels import PixelStore, open_pixel_store

logger = logging.getLogger(__name__)


def model_cache(settings: Settings) -> ModelCache:
    return ModelCache(
        device=settings.device,
        precision=settings.precision,
        rerank_max_batch_pairs=settings.rerank_max_batch_pairs,
        rerank_batch_wait_s=settings.rerank_batch_wait_ms / 1000,
    )


def build_task_context(
    settings: Settings, index_factory: Callable[[], VectorIndex] | None = None
) -> TaskContext:
    """What a worker process runs its tasks with (``index_factory``: where workers write
    vectors themselves, a Qdrant server)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if index_factory is None and settings.workers_write_index:

        def index_factory() -> VectorIndex:
            return open_index(settings, "write")

    db = Database(settings.sqlalchemy_url)
    return TaskContext(
        settings=settings,
        db=db,
        models=model_cache(settings),
        pixels=open_pixel_store(settings, db),
        index_factory=index_factory,
    )


@contextlib.contextmanager
def _cpu_tasks_single_threaded(settings: Settings) -> Iterator[None]:
    """In-process on a CPU, several single-threaded forwards side by side (one per task
    thread) beat one forward spread over every core at ingest's batch sizes: measured here,
    2 cores, small profile: ~570 images/s against ~500. Queries keep all threads."""
    if settings.broker_url or select_device(settings.device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class App:
    """Every collaborator of one process, built once, on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.db = Database(settings.sqlalchemy_url)
        self.models = model_cache(settings)
        self.pixels: PixelStore = open_pixel_store(settings, self.db)
        self._index: VectorIndex | None = None
        self._dispatcher: Dispatcher | None = None
        self._local_dispatcher: InProcessDispatcher | None = None

    def index(self, mode: IndexMode) -> VectorIndex:
        """The index, opened on first use: ``"write"`` queues behind another writer of an
        embedded store, ``"read"`` fails at once while one holds it. Once open, it serves
        both (this process then holds the embedded store)."""
        if self._index is None:
            self._index = open_index(self.settings, mode)
        return self._index

    def task_context(self) -> TaskContext:
        return TaskContext(
            settings=self.settings,
            db=self.db,
            models=self.models,
            pixels=self.pixels,
            index_factory=lambda: self.index("write"),
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
        self,
        root: Path,
        *,
        sync: bool = False,
        progress: ProgressCallback | None = None,
        max_delete: DeleteLimit | None = None,
        notice: Callable[[str], None] = logger.warning,
    ) -> IngestSummary:
        index = self.index("write")
        version = ensure_active_embedder(self.db, self.settings)
        reconcile_alias(self.settings, self.db, index)  # a switch that crashed midway
        if isinstance(self.dispatcher, CeleryDispatcher):
            check_consumers(
                self.dispatcher,
                EMBED_QUEUE,
                stop=self.settings.ingest_without_worker == "stop",
                notice=notice,
                waits_s=self.settings.embed_task_timeout_s,
            )
        coordinator = IngestCoordinator(
            self.settings,
            self.db,
            index,
            self.dispatcher,
            version,
            embedder_dim(version.file),
            max_in_flight=self.settings.ingest_tasks_in_flight,
        )
        with _cpu_tasks_single_threaded(self.settings):
            return coordinator.run(root, sync=sync, progress=progress, max_delete=max_delete)

    def switch_embedder(
        self, version_id: int, progress: Callable[[int, int], None] | None = None
    ) -> SwapReport:
        """Re-embed the catalog with ``version_id`` and switch queries to it."""
        index = self.index("write")
        reconcile_alias(self.settings, self.db, index)
        with _cpu_tasks_single_threaded(self.settings):
            return switch_embedder(
                self.settings, self.db, index, self.dispatcher, version_id, progress=progress
            )

    def search_service(
        self, rerank_stage: RerankStage | None = None, *, record_queries: bool = True
    ) -> SearchService:
        return SearchService(
            self.settings,
            self.db,
            self.index("read"),
            self.models,
            rerank_stage
            or StirRerankStage(
                self.db, lambda: self.dispatcher, timeout_s=self.settings.rerank_timeout_s
            ),
            QueryRecorder(self.db, self.settings.query_images_dir) if record_queries else None,
        )

    def in_process_rerank_stage(self) -> StirRerankStage:
        """STIR run by this process's own task threads, without a deadline: what an
        evaluation injects into the query path (the same task code a rerank worker runs)."""
        dispatcher = self._local_dispatcher
        if dispatcher is None:
            dispatcher = self._local_dispatcher = InProcessDispatcher(
                task_functions(self.task_context()), threads=1
            )
        return StirRerankStage(self.db, lambda: dispatcher, timeout_s=None)

    def status(self) -> dict[str, Any]:
        return catalog_status(self.settings, self.db, self.index("read"))

    def check_broker(self) -> None:
        """Raise BrokerError unless the configured broker answers (cluster mode)."""
        dispatcher = self.dispatcher  # a Celery dispatcher checks the broker when built
        if isinstance(dispatcher, CeleryDispatcher):
            dispatcher.check_broker()

    def close(self) -> None:
        self.models.close()
        for dispatcher in (self._dispatcher, self._local_dispatcher):
            if dispatcher is not None:
                dispatcher.close()
        if self._index is not None:
            self._index.close()
        self.pixels.close()
        self.db.dispose()


def asgi_app() -> Any:
    """The HTTP API built from the environment's settings: the factory each
    ``searchsvc serve --workers N`` replica process runs (cluster settings)."""
    from searchsvc.core.config import load_settings
    from searchsvc.serving.http.api import create_api

    return create_api(App(load_settings()))


def serve(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Run the HTTP API until interrupted. Embedded defaults: one process owns the store
    and announces its address in the home, for the CLI's other commands to reach it."""
    import uvicorn

    from searchsvc.core.errors import ConfigError
    from searchsvc.serving.http.api import create_api
    from searchsvc.serving.http.listen import listening_socket
    from searchsvc.serving.http.local import announce, withdraw

    embedded = not settings.qdrant_url
    if workers > 1:
        if embedded:
            raise ConfigError(
                "--workers > 1 needs a Qdrant server (SEARCHSVC_QDRANT_URL): an embedded "
                "store has one owner process"
            )
        uvicorn.run("searchsvc.app:asgi_app", factory=True, host=host, port=port, workers=workers)
        return
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    loopback = host in {"127.0.0.1", "localhost", "::1"}
    app = App(settings)
    try:
        api = create_api(app, local_ingest=embedded and loopback)
        server = uvicorn.Server(uvicorn.Config(api, log_level="info", timeout_keep_alive=30))
        url_host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host
        url = (
            f"http://{url_host}:{bound}" if ":" not in url_host else f"http://[{url_host}]:{bound}"
        )
        print(f"searchsvc serving on {url} (page at {url}/)", flush=True)
        if embedded:
            announce(settings.home, url)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn has shut down cleanly and re-raises the signal it caught
        finally:
            if embedded:
                withdraw(settings.home)
    finally:
        app.close()
