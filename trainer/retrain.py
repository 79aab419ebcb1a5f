"""The learning loop: ``python -m trainer.retrain``.

Reads the catalog, the logged queries and the feedback from the DB, splits them by product
(:mod:`searchsvc.learning.training_data`), trains a new embedder and a new STIR, evaluates
them against the serving models on the same validation split
(:mod:`searchsvc.learning.evaluation`), and promotes only what wins
(:mod:`searchsvc.learning.gate`, :mod:`searchsvc.jobs.switch`): a new embedder is
re-embedded into a new collection and switched to in one alias move, with queries served by
the old models throughout; a new STIR is switched to by activating it.

Resumable: a run's files live in ``$SEARCHSVC_HOME/retrain/run-<fingerprint>``, the
fingerprint covering the data, the configuration and the serving versions. Run the same
command again after a crash and it continues (training from the last epoch's state, a
recorded candidate is not trained again, an interrupted re-embedding is redone).

The vector index is opened only for the switch (an embedded store admits one process at
a time): training and evaluation read the DB and the image files.

Benchmarks call :func:`retrain` with their own settings (their own home, DB and catalog),
budgets and :class:`RetrainConfig`, or go one level down to
:func:`trainer.embedder.train_embedder`, :func:`trainer.stir.train_stir` and
:func:`searchsvc.learning.evaluation.evaluate` with arrays of their own.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import click
import numpy as np
from tqdm import tqdm

from searchsvc.app import App
from searchsvc.core.config import Settings, load_settings
from searchsvc.core.errors import SearchsvcError
from searchsvc.core.files import config_path_for
from searchsvc.core.profiles import EmbedderSpec
from searchsvc.core.progress import bar_disabled
from searchsvc.jobs.model_files import ensure_active_embedder
from searchsvc.jobs.switch import SwapReport, switch_stir
from searchsvc.learning.evaluation import (
    KS,
    TOP_NS,
    EvalReport,
    EvalSet,
    FirstStageResult,
    evaluate,
    format_table,
    rank_eval_set,
)
from searchsvc.learning.gate import Gate, GateDecision, decide, record_candidate
from searchsvc.learning.training_data import (
    DataSplit,
    LabelledImage,
    PixelLoader,
    TrainingData,
    load_size_for,
    load_training_data,
    refs_of,
    require_val_queries,
    sample_validation,
    split_data,
)
from searchsvc.models.embedder import (
    Embedder,
    EmbeddingNet,
    load_embedding_net,
    new_embedding_net,
    profile_spec,
    save_embedder,
)
from searchsvc.models.stir import StirNet, StirScorer, load_stir, save_stir
from searchsvc.storage.db import Database, ModelKind
from searchsvc.storage.pixels import PixelStore
from searchsvc.storage.versions import VersionRef, active_version, merge_metrics
from trainer.data import TrainSet
from trainer.distributed import SINGLE, Distributed, current, init_from_env, shutdown
from trainer.embedder import EmbedderTrainConfig, train_embedder
from trainer.loop import Budget, Log, TrainResult, stderr_log
from trainer.pixel_rows import write_pixel_rows
from trainer.samplers import BalancedBatchSampler
from trainer.stir import StirTrainConfig, choose_scoring, frozen_embeddings, train_stir

TRAIN_PIXELS = "train-pixels.u8"
"""The run folder's training pixels (:func:`trainer.pixel_rows.write_pixel_rows`)."""
MIN_STIR_SHARE = 0.1
"""STIR is not started with less than this share of the budget left (it would return its
untrained start, which the gate refuses anyway)."""
Only = Literal["both", "embedder", "stir"]
Init = Literal["active", "profile"]


@dataclass(frozen=True)
class RetrainConfig:
    """Everything a retrain decides; recorded on the model versions it produces."""

    only: Only = "both"
    max_minutes: float | None = None
    """Wall-clock budget of the TRAINING (pixel loading included; the final evaluation
    and the re-embedding come after it). Both models: the embedder gets
    ``embedder_share`` of it. None: the configured epochs or steps."""
    embedder_share: float = 0.6
    dry_run: bool = False
    """Read the data, make the split, print the plan; train nothing."""
    promote: bool = True
    """False: train, evaluate and record candidates, but put nothing in service."""
    split_seed: int = 0
    val_fraction: float = 0.2
    val_sample_images: int = 20_000
    """The validation side is cut to this many images (:func:`sample_validation`)."""
    gate_metric: str = "cmc@1"
    gate_margin: float = 0.01
    """Absolute (metrics are in [0, 1]): 0.01 is one point of CMC@1."""
    init: Init = "active"
    """The new embedder starts from the serving one (``active``) or from the configured
    profile's start weights (``profile``)."""
    embedder: EmbedderTrainConfig = field(default_factory=EmbedderTrainConfig)
    stir: StirTrainConfig = field(default_factory=StirTrainConfig)
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        Gate(self.gate_metric, self.gate_margin)  # validates both
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise SearchsvcError(f"--max-minutes must be positive, got {self.max_minutes}")
        if not 0.0 < self.embedder_share < 1.0:
            raise SearchsvcError("embedder_share must be between 0 and 1")

    @classmethod
    def for_settings(cls, settings: Settings, **changes: Any) -> RetrainConfig:
        """Defaults that follow the settings: split seed and fraction, device, precision,
        and ``SEARCHSVC_SEED`` as the training seed."""
        base = cls(
            split_seed=settings.split_seed,
            val_fraction=settings.val_fraction,
            val_sample_images=settings.val_sample_images,
            embedder=EmbedderTrainConfig(
                seed=settings.seed, device=settings.device, precision=settings.precision
            ),
            stir=StirTrainConfig(
                seed=settings.seed, device=settings.device, precision=settings.precision
            ),
        )
        return replace(base, **changes)

    @property
    def gate(self) -> Gate:
        return Gate(self.gate_metric, self.gate_margin)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint_json(self) -> dict[str, Any]:
        """What makes two runs the same run (a budget or a flag does not)."""
        data = self.to_json()
        for name in ("max_minutes", "dry_run", "promote", "resume", "progress"):
            data.pop(name)
        return data


@dataclass
class StageOutcome:
    """One model's way through the loop."""

    kind: str
    candidate_version: int | None = None
    promoted: bool = False
    skipped: str | None = None
    """Why no candidate was trained (the budget was spent), if so."""
    decision: GateDecision | None = None
    candidate: EvalReport | None = None
    baseline: EvalReport | None = None
    swap: SwapReport | None = None
    train: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "candidate_version": self.candidate_version,
            "promoted": self.promoted,
            "skipped": self.skipped,
            "decision": self.decision.to_json() if self.decision else None,
            "candidate": self.candidate.to_json() if self.candidate else None,
            "baseline": self.baseline.to_json() if self.baseline else None,
            "swap": self.swap.to_json() if self.swap else None,
            "train": self.train,
        }


@dataclass
class RetrainReport:
    run_dir: Path
    dry_run: bool
    data: dict[str, int]
    split: dict[str, Any]
    plan: dict[str, Any]
    stages: dict[str, StageOutcome] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "dry_run": self.dry_run,
            "data": self.data,
            "split": self.split,
            "plan": self.plan,
            "stages": {name: stage.to_json() for name, stage in self.stages.items()},
            "seconds": round(self.seconds, 3),
        }


# ------------------------------------------------------------------------------- the run


class _RunState:
    """``run.json`` of a run directory: what is done, so a re-run continues."""

    def __init__(self, run_dir: Path, fingerprint: str, fresh: bool) -> None:
        self.path = run_dir / "run.json"
        state: dict[str, Any] = {}
        if self.path.is_file() and not fresh:
            state = json.loads(self.path.read_text(encoding="utf-8"))
            if state.get("fingerprint") != fingerprint or state.get("finished"):
                state = {}
        if not state:
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = state or {"fingerprint": fingerprint}
        self.save()

    def stage(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str), encoding="utf-8")
        tmp.replace(self.path)


@dataclass(frozen=True)
class RetrainServices:
    """What a retrain needs of the running system: the metadata DB, the pixel store (cached
    copies of the catalog's pixels) and the embedder switch (re-embed, then move the alias:
    the only step that opens the index)."""

    db: Database
    pixels: PixelStore
    switch_embedder: Callable[[int, Callable[[int, int], None] | None], SwapReport]

    @classmethod
    def of(cls, app: App) -> RetrainServices:
        """The app's services; the switch goes through a running `searchsvc serve` where one
        owns the embedded store (it cannot be opened beside it)."""
        from searchsvc.serving.http.local import find_local_server, switch_through

        server = find_local_server(app.settings)
        if server is not None:
            return cls(app.db, app.pixels, switch_through(server))
        return cls(app.db, app.pixels, app.switch_embedder)


@dataclass(frozen=True)
class _Run:
    """What every stage of one retrain reads."""

    settings: Settings
    config: RetrainConfig
    services: RetrainServices
    state: _RunState
    data: TrainingData
    split: DataSplit
    val_set: EvalSet
    train_set: TrainSet
    run_dir: Path
    log: Log
    distributed: Distributed = SINGLE
    """This process's rank under ``torchrun`` (:mod:`trainer.distributed`)."""


def retrain(
    settings: Settings,
    config: RetrainConfig,
    *,
    data: TrainingData | None = None,
    services: RetrainServices | None = None,
    log: Log = stderr_log,
) -> RetrainReport:
    """Train, evaluate, gate and (unless told not to) promote; see the module docstring.

    ``data`` replaces what the DB holds (a benchmark's own labelled set); ``services`` are
    the caller's (its index is the one the switch uses: an embedded store opens once); by
    default the retrain builds its own.
    """
    started = time.monotonic()
    budget_s = None if config.max_minutes is None else config.max_minutes * 60
    own_app = App(settings) if services is None else None
    services = services or RetrainServices.of(own_app)  # type: ignore[arg-type]
    try:
        data = data or load_training_data(services.db)
        if not any(i.source == "catalog" for i in data.images):
            raise SearchsvcError("no indexed catalog images: run 'searchsvc ingest CATALOG' first")
        split = sample_validation(
            split_data(data, seed=config.split_seed, val_fraction=config.val_fraction),
            config.val_sample_images,
        )
        require_val_queries(split)
        serving = ensure_active_embedder(services.db, settings)
        serving_stir = active_version(services.db, ModelKind.STIR)
        serving_net = load_embedding_net(serving.file)
        load_size = load_size_for(serving_net.spec.input_size)
        fingerprint = _fingerprint(config, data, serving, serving_stir, load_size)
        run_dir = settings.home / "retrain" / f"run-{fingerprint[:16]}"
        plan = _plan(config, split, budget_s)
        report = RetrainReport(run_dir, config.dry_run, data.counts, split.record, plan)
        log(
            f"retrain: {data.counts.get('catalog_images', 0)} catalog images, "
            f"{data.counts.get('query_images', 0)} query photos with positive feedback, "
            f"{data.counts.get('hard_negatives', 0)} hard negatives, "
            f"{data.counts.get('products', 0)} products"
        )
        log(
            f"split (seed {config.split_seed}, {config.val_fraction:.0%} validation): "
            f"train {split.record['train']['products']} products, "
            f"validation {split.record['val']['products']} products"
        )
        log("plan: " + json.dumps(plan))
        if config.dry_run:
            report.seconds = time.monotonic() - started
            return report

        distributed = current()
        if distributed.active:
            if budget_s is not None:
                raise SearchsvcError(
                    "a distributed retrain takes step counts (--embedder-steps), not "
                    "--max-minutes: each process would plan its own steps"
                )
            if not distributed.is_main:  # its own folder: rank 0's alone is recorded
                run_dir = run_dir.with_name(f"{run_dir.name}-rank{distributed.rank}")
        # A distributed run does not resume: every rank would have to resume at one step.
        state = _RunState(run_dir, fingerprint, fresh=not config.resume or distributed.active)
        loader = PixelLoader(settings.max_image_bytes, settings.max_image_pixels, services.pixels)
        val_set = EvalSet.from_split(split, loader)
        train_set, negatives = _training_pixels(
            split, loader, load_size, config.progress, log, run_dir / TRAIN_PIXELS
        )
        run = _Run(
            settings,
            config,
            services,
            state,
            data,
            split,
            val_set,
            train_set,
            run_dir,
            log,
            distributed,
        )
        share = config.embedder_share if config.only == "both" else 1.0
        total = Budget(None if budget_s is None else started + budget_s)
        embedder_budget = Budget(None if budget_s is None else started + share * budget_s)

        serving_after = serving_net
        if config.only in ("both", "embedder"):
            outcome, new_net = _embedder_stage(run, serving, serving_net, embedder_budget)
            report.stages["embedder"] = outcome
            if outcome.decision is not None and outcome.decision.passed:
                serving_after = new_net
        if not distributed.is_main:
            # Trained its share; rank 0 evaluates, gates, records, promotes, trains STIR.
            shutil.rmtree(run_dir, ignore_errors=True)
            report.seconds = time.monotonic() - started
            return report
        if (
            config.only in ("both", "stir")
            and budget_s is not None
            and (total.remaining() < MIN_STIR_SHARE * budget_s)
        ):
            log("stir: skipped, the time budget is spent (give --max-minutes more, or --only stir)")
            report.stages["stir"] = StageOutcome("stir", skipped="time budget spent")
        elif config.only in ("both", "stir"):
            report.stages["stir"] = _stir_stage(run, negatives, serving_after, serving_stir, total)
        # Both switches at the end, the embedder first: the STIR was gated on the embedder
        # that serves after it, and the index (one process at a time when embedded) is
        # opened only now, for the seconds of the re-embedding.
        if config.promote:
            embedder_stage = report.stages.get("embedder")
            if embedder_stage and embedder_stage.decision and embedder_stage.decision.passed:
                _promote_embedder_stage(run, embedder_stage)
            stir_stage = report.stages.get("stir")
            if stir_stage and stir_stage.decision and stir_stage.decision.passed:
                _promote_stir_stage(run, stir_stage)
        report.seconds = time.monotonic() - started
        state.data["finished"] = True
        state.save()
        (run_dir / "report.json").write_text(
            json.dumps(report.to_json(), indent=2, default=str), encoding="utf-8"
        )
        for leftover in run_dir.glob("*.safetensors"):  # registered versions hold copies
            _remove_checkpoint(leftover)
        (run_dir / TRAIN_PIXELS).unlink(missing_ok=True)  # as large as the training side
        return report
    finally:
        if own_app is not None:
            own_app.close()


def _fingerprint(
    config: RetrainConfig,
    data: TrainingData,
    serving: VersionRef,
    serving_stir: VersionRef | None,
    load_size: int,
) -> str:
    blob = json.dumps(
        {
            "config": config.fingerprint_json(),
            "data": data.fingerprint(),
            "embedder": serving.id,
            "stir": None if serving_stir is None else serving_stir.id,
            "load_size": load_size,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _plan(config: RetrainConfig, split: DataSplit, budget_s: float | None) -> dict[str, Any]:
    labels = TrainSet.from_names(
        np.zeros((len(split.train), 1, 1, 3), np.uint8), [i.label for i in split.train]
    ).labels
    plan: dict[str, Any] = {"budget_s": budget_s, "only": config.only}
    for name, cfg in (("embedder", config.embedder), ("stir", config.stir)):
        if config.only not in ("both", name):
            continue
        per_epoch = len(BalancedBatchSampler(labels, cfg.n_labels, cfg.n_instances, cfg.seed))
        plan[name] = {
            "steps_per_epoch": per_epoch,
            "steps": cfg.steps or cfg.epochs * per_epoch,
            "batch": f"{cfg.n_labels} x {cfg.n_instances}",
        }
    return plan


def _training_pixels(
    split: DataSplit,
    loader: PixelLoader,
    load_size: int,
    progress: bool,
    log: Log,
    path: Path,
) -> tuple[TrainSet, np.ndarray]:
    """The training side's pixels (decoded at the load size into rows on disk at ``path``,
    read a batch at a time: :mod:`trainer.pixel_rows`) and the logged hard negatives as
    item index pairs; query photos that only appear in a hard negative are added
    unlabelled."""
    from tqdm import tqdm

    items: list[LabelledImage | None] = list(split.train)
    refs = refs_of(split.train)
    by_image = {i.image_id: n for n, i in enumerate(split.train) if i.image_id is not None}
    by_query = {i.query_id: n for n, i in enumerate(split.train) if i.query_id is not None}
    pairs: list[tuple[int, int]] = []
    for neg in split.train_hard_negatives:
        if neg.negative_image_id not in by_image:
            continue
        if neg.query_id not in by_query:
            by_query[neg.query_id] = len(refs)
            refs.append((neg.query_path, neg.query_hash))
            items.append(None)
        pairs.append((by_query[neg.query_id], by_image[neg.negative_image_id]))
    with tqdm(total=len(refs), desc="pixels", unit="img", disable=bar_disabled(progress)) as bar:
        pixels, ok = write_pixel_rows(
            path, loader, refs, load_size, progress=lambda n: bar.update(n - bar.n)
        )
    names = [None if item is None else item.label for item in items]
    if not ok.all():
        unread = [str(refs[k][0]) for k in np.flatnonzero(~ok)]
        labels = {names[k] for k in np.flatnonzero(ok) if names[k] is not None}
        if len(labels) < 2:
            # Training reads the catalog's original files: a catalog moved or unmounted
            # since the ingest leaves nothing to train on. One line, naming the first.
            raise SearchsvcError(
                f"retrain: {len(unread)} of {len(refs)} training images could not be read "
                f"(first: {unread[0]}), leaving {len(labels)} products to train on (need 2): "
                "was the catalog moved since the ingest? Restore it there, or ingest it again "
                "from its new place"
            )
        log(
            f"retrain: {len(unread)} training images could not be read "
            f"(first: {unread[0]}); left out"
        )
    keep = np.flatnonzero(ok)
    remap = np.full(len(refs), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    negatives = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    negatives = remap[negatives]
    negatives = negatives[(negatives >= 0).all(axis=1)]
    return TrainSet.from_names(pixels, [names[k] for k in keep]), negatives


def _training_record(
    run: _Run, result: TrainResult | None, stage: str, spec: EmbedderSpec
) -> dict[str, Any]:
    config = run.config
    sub: EmbedderTrainConfig | StirTrainConfig = (
        config.embedder.resolve(spec) if stage == "embedder" else config.stir
    )
    return {
        "data": run.data.counts,
        "split": run.split.record,
        "seeds": {"split": config.split_seed, stage: sub.seed},
        "config": sub.to_json(),
        "gate": {"metric": config.gate_metric, "margin": config.gate_margin},
        "init": config.init if stage == "embedder" else "from the serving embedder",
        "result": None if result is None else result.to_json(),
    }


Net = TypeVar("Net", EmbeddingNet, StirNet)


@dataclass(frozen=True)
class _Verdict:
    """A candidate's evaluation beside the serving model's, and the gate's numbers."""

    candidate: EvalReport
    baseline: EvalReport
    shown: dict[str, EvalReport]
    """The table the log prints."""
    candidate_value: float
    baseline_value: float
    baseline_version: int | None
    what: str


@dataclass(frozen=True)
class _Stage(Generic[Net]):
    """One model's way through the loop, as plug-ins of :func:`_run_stage`."""

    kind: ModelKind
    load: Callable[[Path], Net]
    train: Callable[[Path], tuple[Net, dict[str, Any]]]
    """Trains a candidate, writes it to the given file; returns it and its training record."""
    judge: Callable[[Net], _Verdict]


def _run_stage(run: _Run, stage: _Stage[Net]) -> tuple[StageOutcome, Net]:
    """Train a candidate (once: a resumed run reloads it), evaluate it beside what serves,
    let the gate decide, and record it as a version (once, too)."""
    name = stage.kind.value
    progress = run.state.stage(name)
    candidate_file = run.run_dir / f"{name}-candidate.safetensors"
    outcome = StageOutcome(name)
    if "train" in progress and candidate_file.is_file():
        net = stage.load(candidate_file)
        outcome.train = progress["train"]
        run.log(f"{name}: candidate already trained ({candidate_file})")
    else:
        net, outcome.train = stage.train(candidate_file)
        progress["train"] = outcome.train
        run.state.save()
    if not run.distributed.is_main:
        return outcome, net  # rank 0 alone judges and records

    if "version_id" in progress:  # the decision a resumed run already recorded
        outcome.candidate_version = progress["version_id"]
        outcome.decision = GateDecision(**progress["decision"])
        outcome.candidate = EvalReport(**progress["candidate"])
        outcome.baseline = EvalReport(**progress["baseline"])
        return outcome, net
    verdict = stage.judge(net)
    decision = decide(
        run.config.gate, verdict.candidate_value, verdict.baseline_value, what=verdict.what
    )
    run.log(format_table(verdict.shown))
    run.log(decision.reason)
    version_id = record_candidate(
        run.services.db,
        run.settings,
        stage.kind,
        candidate_file,
        metrics={
            "validation": verdict.candidate.to_json(),
            "val_sample": run.split.val_sample,
            "baseline": {"version": verdict.baseline_version, **verdict.baseline.to_json()},
            "gate": decision.to_json(),
            "promoted": False,
        },
        training=outcome.train or {},
        notes=f"retrain candidate: {decision.reason}",
    )
    outcome.candidate_version, outcome.decision = version_id, decision
    outcome.candidate, outcome.baseline = verdict.candidate, verdict.baseline
    progress.update(
        version_id=version_id,
        decision=decision.to_json(),
        candidate=verdict.candidate.to_json(),
        baseline=verdict.baseline.to_json(),
    )
    run.state.save()
    return outcome, net


def _embedder_stage(
    run: _Run, serving: VersionRef, serving_net: EmbeddingNet, budget: Budget
) -> tuple[StageOutcome, EmbeddingNet]:
    settings, config = run.settings, run.config

    def embedder_of(net: EmbeddingNet) -> Embedder:
        return Embedder(net, device=settings.device, precision=settings.precision)

    def train(candidate_file: Path) -> tuple[EmbeddingNet, dict[str, Any]]:
        if config.init == "active":
            net = copy.deepcopy(serving_net)
        else:
            net = new_embedding_net(
                profile_spec(settings.embedder_profile), seed=config.embedder.seed
            )

        def validate(model: Any) -> dict[str, float]:
            return rank_eval_set(
                run.val_set, embedder_of(model), batch_size=settings.batch_size
            ).base.metrics

        state_file = run.run_dir / "embedder-state.safetensors"
        main_rank = run.distributed.is_main
        result = train_embedder(
            net,
            run.train_set,
            config.embedder,
            # Rank 0 picks the best weights; the others' copies are never recorded.
            validate=validate if main_rank else None,
            budget=budget,
            state_path=state_file if main_rank else None,
            log=run.log,
            progress=config.progress and main_rank,
            distributed=run.distributed,
        )
        record = _training_record(run, result, "embedder", net.spec)
        save_embedder(net.cpu(), candidate_file, {"training": record})
        _remove_checkpoint(state_file)
        return net, record

    def judge(net: EmbeddingNet) -> _Verdict:
        candidate = evaluate(
            run.val_set,
            embedder_of(net),
            batch_size=settings.batch_size,
            models={"embedder": "candidate"},
        )
        baseline = evaluate(
            run.val_set,
            embedder_of(serving_net),
            batch_size=settings.batch_size,
            models={"embedder": f"v{serving.id}"},
        )
        return _Verdict(
            candidate,
            baseline,
            {"serving": baseline, "candidate": candidate},
            candidate.metric(config.gate_metric),
            baseline.metric(config.gate_metric),
            serving.id,
            "embedder",
        )

    return _run_stage(run, _Stage(ModelKind.EMBEDDER, load_embedding_net, train, judge))


def _stir_stage(
    run: _Run,
    negatives: np.ndarray,
    serving_net: EmbeddingNet,
    serving_stir: VersionRef | None,
    budget: Budget,
) -> StageOutcome:
    """STIR is trained from (and mined with) the embedder that serves after the embedder
    stage: the new one when it was promoted. Its gate compares reranking that embedder's
    results with the serving reranker (or with no reranker, when none is active)."""
    settings, config, log = run.settings, run.config, run.log
    top_n = settings.rerank_top_n
    top_ns = sorted({*TOP_NS, top_n})
    embedder = Embedder(serving_net, device=settings.device, precision=settings.precision)
    first_stage = rank_eval_set(
        run.val_set, embedder, depth=max([*KS, *top_ns]), batch_size=settings.batch_size
    )

    def scorer_of(net: StirNet) -> StirScorer:
        return StirScorer(net, device=settings.device, precision=settings.precision)

    def train(candidate_file: Path) -> tuple[StirNet, dict[str, Any]]:
        def validate(model: Any) -> dict[str, float]:
            # Score calibration: the fusion weight that reranks this split best (0 = STIR
            # alone) is part of what validation selects. One pair order here: the choice
            # of symmetric scoring is made once, after training (choose_scoring).
            return first_stage.calibrated(
                scorer_of(model).score_pairs, model.spec.input_size, top_n, try_symmetric=False
            ).validation_metrics()

        embeddings = frozen_embeddings(
            serving_net,
            run.train_set,
            device=settings.device,
            precision=settings.precision,
            cache_path=run.run_dir / "stir-train-embeddings.safetensors",
        )
        net, result = train_stir(
            serving_net,
            run.train_set,
            config.stir,
            embeddings=embeddings,
            hard_negatives=negatives,
            validate=validate,
            budget=budget,
            state_path=run.run_dir / "stir-state.safetensors",
            log=log,
            progress=config.progress,
        )
        choice, options = choose_scoring(
            net, first_stage, top_n, device=settings.device, precision=settings.precision
        )
        net.config = replace(net.config, calibrated_top_n=top_n)
        log(
            f"stir: scoring chosen on validation: "
            f"{'symmetric' if choice.symmetric else 'one way'}, fusion weight "
            f"{choice.fusion_weight:g} (cmc@1 "
            + ", ".join(
                f"{'symmetric' if o.symmetric else 'one way'} {100 * o.rows['cmc@1']:.2f}"
                for o in options
            )
            + ")"
        )
        record = _training_record(run, result, "stir", serving_net.spec)
        record["hard_negatives_used"] = int(len(negatives))
        record["scoring"] = {
            "fusion_weight": choice.fusion_weight,
            "symmetric": choice.symmetric,
            "calibrated_top_n": top_n,
            "options": [
                {"symmetric": o.symmetric, "fusion_weight": o.fusion_weight, **o.rows}
                for o in options
            ],
        }
        save_stir(net.cpu(), candidate_file, {"training": record})
        _remove_checkpoint(run.run_dir / "stir-state.safetensors")
        return net, record

    def judge(net: StirNet) -> _Verdict:
        base_rows = {"embedder": first_stage.base.metrics}

        def reranked_by(scorer: StirScorer) -> dict[str, dict[str, float]]:
            return {
                **base_rows,
                **first_stage.reranked(
                    scorer.score_pairs,
                    scorer.info.input_size,
                    top_ns,
                    fusion_weight=scorer.info.fusion_weight,
                ),
            }

        candidate = _report(first_stage, reranked_by(scorer_of(net)), {"stir": "candidate"})
        if serving_stir is not None:
            serving_scorer = StirScorer.from_file(
                serving_stir.file, device=settings.device, precision=settings.precision
            )
            baseline = _report(
                first_stage, reranked_by(serving_scorer), {"stir": f"v{serving_stir.id}"}
            )
            baseline_value = baseline.metric(config.gate_metric, f"stir@{top_n}")
        else:
            baseline = _report(first_stage, base_rows, {"stir": "none"})
            baseline_value = baseline.metric(config.gate_metric, "embedder")
        stir_rows = {k: v for k, v in candidate.rows.items() if k != "embedder"}
        return _Verdict(
            candidate,
            baseline,
            {"serving": baseline, "candidate": replace(candidate, rows=stir_rows)},
            candidate.metric(config.gate_metric, f"stir@{top_n}"),
            baseline_value,
            None if serving_stir is None else serving_stir.id,
            f"stir at top_n {top_n}",
        )

    outcome, _ = _run_stage(run, _Stage(ModelKind.STIR, load_stir, train, judge))
    return outcome


def _promote_embedder_stage(run: _Run, outcome: StageOutcome) -> None:
    """Re-embed and switch (once: a resumed run that already switched only reports it)."""
    stage = run.state.stage("embedder")
    assert outcome.candidate_version is not None
    if not stage.get("swapped"):
        run.log(f"embedder: re-embedding the catalog with v{outcome.candidate_version}")
        with tqdm(desc="re-embed", unit="img", disable=bar_disabled(run.config.progress)) as bar:

            def report(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            swap = run.services.switch_embedder(outcome.candidate_version, report)
        merge_metrics(
            run.services.db, outcome.candidate_version, promoted=True, swap=swap.to_json()
        )
        stage.update(swapped=True, swap=swap.to_json())
        run.state.save()
        run.log(
            f"embedder: v{outcome.candidate_version} serves; collection "
            f"{swap.collection} ({swap.images_embedded} images, {swap.seconds:.1f} s), "
            f"{swap.previous_collection} kept until a cleanup"
        )
    outcome.promoted = True
    outcome.swap = SwapReport(**stage["swap"])


def _promote_stir_stage(run: _Run, outcome: StageOutcome) -> None:
    assert outcome.candidate_version is not None
    switch_stir(run.services.db, outcome.candidate_version)
    merge_metrics(run.services.db, outcome.candidate_version, promoted=True)
    outcome.promoted = True
    run.log(f"stir: v{outcome.candidate_version} serves from the next query on")


def _report(
    first_stage: FirstStageResult, rows: dict[str, dict[str, float]], models: dict[str, str]
) -> EvalReport:
    return EvalReport(
        rows=rows,
        n_queries=first_stage.base.n_queries,
        n_skipped=first_stage.base.n_skipped,
        n_gallery=len(first_stage.eval_set.gallery),
        models=models,
    )


def _remove_checkpoint(path: Path) -> None:
    """A finished stage's training state is no longer needed (the candidate file is)."""
    path.unlink(missing_ok=True)
    config_path_for(path).unlink(missing_ok=True)


# ------------------------------------------------------------------------------- the CLI


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    help="Data folder (overrides SEARCHSVC_HOME).",
)
@click.option("--only", type=click.Choice(["embedder", "stir"]), help="Train one model only.")
@click.option(
    "--max-minutes",
    type=click.FloatRange(min=0, min_open=True),
    help="Time budget of the training (evaluation and re-embedding come after).",
)
@click.option("--dry-run", is_flag=True, help="Read the data, print the split and the plan.")
@click.option("--no-promote", is_flag=True, help="Record candidates; put nothing in service.")
@click.option("--seed", type=int, help="Training seed (default SEARCHSVC_SEED).")
@click.option("--gate-metric", default="cmc@1", show_default=True)
@click.option(
    "--gate-margin",
    default=0.01,
    show_default=True,
    type=float,
    help="Absolute improvement needed (0.01 = one point).",
)
@click.option(
    "--init",
    type=click.Choice(["active", "profile"]),
    default="active",
    show_default=True,
    help="Start the embedder from the serving one, or afresh.",
)
@click.option("--embedder-epochs", type=click.IntRange(min=1))
@click.option("--embedder-steps", type=click.IntRange(min=1))
@click.option("--embedder-lr", type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--margin", type=click.FloatRange(min=0, min_open=True), help="Triplet margin (default 0.15)."
)
@click.option("--stir-epochs", type=click.IntRange(min=1))
@click.option("--stir-steps", type=click.IntRange(min=1))
@click.option("--fresh", is_flag=True, help="Do not resume an interrupted run.")
@click.option("--no-progress", is_flag=True, help="No progress bars (epoch lines only).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def main(
    home: Path | None,
    only: str | None,
    max_minutes: float | None,
    dry_run: bool,
    no_promote: bool,
    seed: int | None,
    gate_metric: str,
    gate_margin: float,
    init: str,
    embedder_epochs: int | None,
    embedder_steps: int | None,
    embedder_lr: float | None,
    margin: float | None,
    stir_epochs: int | None,
    stir_steps: int | None,
    fresh: bool,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Retrain the embedder and the STIR reranker from the catalog and the logged
    feedback; promote what beats the serving models on the validation split."""
    from searchsvc.cli import handle_errors

    @handle_errors
    def run() -> None:
        settings = load_settings(overrides={"home": home} if home is not None else None)
        distributed = init_from_env(settings.device)
        config = RetrainConfig.for_settings(settings)
        embedder_changes: dict[str, Any] = {}
        stir_changes: dict[str, Any] = {}
        if seed is not None:
            embedder_changes["seed"] = stir_changes["seed"] = seed
        for key, value in (
            ("epochs", embedder_epochs),
            ("steps", embedder_steps),
            ("lr", embedder_lr),
            ("margin", margin),
        ):
            if value is not None:
                embedder_changes[key] = value
        for key, value in (("epochs", stir_epochs), ("steps", stir_steps)):
            if value is not None:
                stir_changes[key] = value
        config = replace(
            config,
            only=only or "both",  # type: ignore[arg-type]
            max_minutes=max_minutes,
            dry_run=dry_run,
            promote=not no_promote,
            gate_metric=gate_metric,
            gate_margin=gate_margin,
            init=init,  # type: ignore[arg-type]
            embedder=replace(config.embedder, **embedder_changes),
            stir=replace(config.stir, **stir_changes),
            resume=not fresh,
            progress=not no_progress and not as_json,
        )
        try:
            report = retrain(settings, config)
        finally:
            shutdown()
        if not distributed.is_main:
            return  # rank 0 reports
        if as_json:
            click.echo(json.dumps(report.to_json(), indent=2, default=str))
            return
        if report.dry_run:
            click.echo("dry run: nothing was trained")
            return
        for name, stage in report.stages.items():
            if stage.skipped:
                click.echo(f"{name}: skipped ({stage.skipped})")
                continue
            verdict = "promoted" if stage.promoted else "not promoted"
            reason = stage.decision.reason if stage.decision else ""
            click.echo(f"{name}: candidate v{stage.candidate_version} {verdict} ({reason})")
        click.echo(f"retrain finished in {report.seconds:.1f} s; files in {report.run_dir}")

    run()


if __name__ == "__main__":
    main()
