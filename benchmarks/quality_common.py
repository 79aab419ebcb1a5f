"""The machinery both retrieval-quality benchmarks share.

``bench_quality_class.py`` (Fashion-MNIST, same article type) and
``bench_quality_instance.py`` (same product, new photo) differ in their data; the rest is
here: the comparison they run (:func:`run_comparison`: raw pixels, the embedder trained
by :func:`trainer.embedder.train_embedder`, embedder + STIR trained by
:func:`trainer.stir.train_stir`, the perfect reranker), in-memory evaluation sets, the
first stage in chunks of queries, the validation callbacks, the report (machine, JSON and
Markdown outputs) and the options both take. Ranking, reranking and metrics are the
product's (:mod:`searchsvc.learning.evaluation`, :mod:`searchsvc.learning.metrics`).

The benchmarks run as ``python benchmarks/<script>.py``: this folder is then on
``sys.path`` and ``from quality_common import ...`` finds this module.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_name, git_commit

from searchsvc.core.profiles import PROFILES
from searchsvc.learning.evaluation import (
    KS,
    REPORTED,
    TOP_NS,
    Calibration,
    EvalSet,
    FirstStageResult,
    first_stage,
    score,
)
from searchsvc.learning.gate import Gate, decide
from searchsvc.learning.training_data import LabelledImage, PixelLoader
from searchsvc.models.embedder import (
    Embedder,
    EmbedderInfo,
    new_embedding_net,
    profile_spec,
    save_embedder,
)
from searchsvc.models.fusion import rerank_order
from searchsvc.models.stir import StirScorer, save_stir
from trainer.augment import resize_pixels
from trainer.data import TrainSet
from trainer.embedder import EmbedderTrainConfig, train_embedder
from trainer.loop import Budget, TrainResult, Validate
from trainer.stir import (
    StirTrainConfig,
    choose_scoring,
    frozen_embeddings,
    train_stir,
)

PROFILE = "small"
GATE = Gate(metric="cmc@1", margin=0.0)
"""The benchmark's gate: the retrain command's rule with no margin (a strict gain)."""
DEFAULT_CACHE = Path(os.environ.get("SEARCHSVC_HOME", Path.home() / ".searchsvc")) / "datasets"


# ------------------------------------------------------------------------------ machine info


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ pixels


class ArrayEvalSet(EvalSet):
    """An :class:`EvalSet` whose pixels are arrays held in memory (no files, no DB).

    ``pixels`` maps an input size to ``(gallery pixels, query pixels)``; other sizes are
    resized from the largest given. ``self_index[q]`` is the gallery position of query
    ``q`` (the SOP protocol) or -1.
    """

    def __init__(
        self,
        gallery_labels: Sequence[Any] | np.ndarray,
        query_labels: Sequence[Any] | np.ndarray,
        self_index: np.ndarray,
        pixels: dict[int, tuple[np.ndarray, np.ndarray]],
    ) -> None:
        gallery = [LabelledImage(str(lab), Path(), "", "catalog") for lab in gallery_labels]
        queries = [
            LabelledImage(str(lab), Path(), "", "catalog" if own >= 0 else "query")
            for lab, own in zip(query_labels, self_index, strict=True)
        ]
        super().__init__(gallery, queries, np.asarray(self_index, np.int64), PixelLoader(0, 0))
        self._arrays = dict(pixels)

    def pixels(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if size not in self._arrays:
            gallery, queries = self._arrays[max(self._arrays)]
            self._arrays[size] = (resize_pixels(gallery, size), resize_pixels(queries, size))
        return self._arrays[size]

    def unreadable(self, size: int) -> int:
        return 0


class RawPixelEmbedder:
    """The ``raw pixels`` baseline with the :class:`Embedder` interface: the grey value of
    every pixel (Fashion-MNIST: the three channels are equal) or, with ``colour``, the
    three channels of every pixel (colour photographs), L2-normalised."""

    def __init__(self, size: int, *, colour: bool = False) -> None:
        self.colour = colour
        self.info = EmbedderInfo(input_size=size, dim=size * size * (3 if colour else 1))

    def embed(self, pixels: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        out = np.empty((len(pixels), self.info.dim), dtype=np.float32)
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start : start + batch_size].astype(np.float32)
            if not self.colour:
                chunk = chunk.mean(axis=-1)
            chunk = chunk.reshape(len(chunk), -1)
            norms = np.linalg.norm(chunk, axis=1, keepdims=True)
            out[start : start + batch_size] = chunk / np.maximum(norms, 1e-12)
        return out


# ------------------------------------------------------------------------------ evaluation


def rank_chunked(
    eval_set: EvalSet,
    embedder: Embedder | RawPixelEmbedder,
    *,
    depth: int,
    chunk: int = 1000,
    gallery_vectors: np.ndarray | None = None,
) -> FirstStageResult:
    """:func:`searchsvc.learning.evaluation.rank_eval_set` with the exact brute-force search run on
    ``chunk`` queries at a time (a 10k x 60k float64 distance matrix would be 4.8 GB)."""
    size = embedder.info.input_size
    gallery_px, query_px = eval_set.pixels(size)
    if gallery_vectors is None:
        gallery_vectors = embedder.embed(gallery_px, batch_size=256)
    query_vectors = embedder.embed(query_px, batch_size=256)
    gallery64 = np.asarray(gallery_vectors, dtype=np.float64)
    ranked_parts, dist_parts = [], []
    for start in range(0, len(query_vectors), chunk):
        ranked, dist = first_stage(
            query_vectors[start : start + chunk],
            gallery64,
            depth,
            self_index=eval_set.self_index[start : start + chunk],
        )
        ranked_parts.append(ranked)
        dist_parts.append(dist)
    return FirstStageResult.from_ranking(
        eval_set, np.concatenate(ranked_parts), np.concatenate(dist_parts)
    )


def perfect_rows(result: FirstStageResult, top_ns: Sequence[int]) -> dict[str, dict[str, float]]:
    """The first stage's top ``n`` reordered by an oracle (distance 0 for a relevant item,
    1 otherwise) through the product's rerank merge."""
    labels = result.gallery_labels[result.ranked]
    relevant = labels == np.asarray(result.query_labels, dtype=object)[:, None]
    rows = {}
    for top_n in top_ns:
        n = min(top_n, result.ranked.shape[1])
        oracle = np.where(relevant[:, :n], 0.0, 1.0)
        order = rerank_order(result.distances, oracle, n)
        reordered = np.take_along_axis(result.ranked, order, axis=1)
        rows[f"perfect@{top_n}"] = score(
            result.gallery_labels[reordered], result.query_labels, result.n_relevant
        ).metrics
    return rows


def make_validate_embedder(val_set: EvalSet, precision: str) -> Validate:
    def validate(model: torch.nn.Module) -> dict[str, float]:
        embedder = Embedder(model, device="auto", precision=precision)  # type: ignore[arg-type]
        return rank_chunked(val_set, embedder, depth=max(KS)).base.metrics

    return validate


def make_validate_stir(first: FirstStageResult, precision: str, top_n: int) -> Validate:
    """STIR's validation, as the retrain command runs it: rerank the embedder's ranking of
    the validation set, with the fusion weight calibrated on it (returned as
    ``fusion_weight``); pairs scored one way (the order is chosen after training)."""

    def validate(model: torch.nn.Module) -> dict[str, float]:
        scorer = StirScorer(model, device="auto", precision=precision)  # type: ignore[arg-type]
        return first.calibrated(
            scorer.score_pairs, scorer.info.input_size, top_n, try_symmetric=False
        ).validation_metrics()

    return validate


# ------------------------------------------------------------------------------ the comparison


def train_summary(result: TrainResult) -> dict[str, Any]:
    data = result.to_json()
    history = data.pop("history")
    data["epochs_logged"] = len(history)
    data["history_tail"] = history[-3:]
    return data


def run_comparison(
    *,
    train_set: TrainSet,
    eval_set: EvalSet,
    val_set: EvalSet | None,
    embedder_minutes: float | None,
    stir_minutes: float | None,
    seed: int,
    precision: str,
    chunk: int,
    gallery_is_train: bool,
    timings: dict[str, float],
    progress: bool,
    embedder_config: EmbedderTrainConfig,
    validate_embedder: bool = True,
    stir_steps: int | None = None,
    profile: str = PROFILE,
    raw_colour: bool = False,
    save_models: Path | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, Any], dict[str, Any]]:
    """Train the embedder and STIR through the trainer, evaluate every row. Returns
    (rows, training records, eval counts). A budget of None minutes is no deadline (the
    configs' step counts decide: ``embedder_config.steps``, ``stir_steps``). ``profile``:
    the embedder profile (its input size); ``raw_colour``: the raw-pixel row compares
    colour pixels (real photographs) rather than grey values; ``save_models``: a folder
    the trained embedder and STIR (with the fusion weight and pair order validation
    chose) are saved to, as ``embedder.safetensors`` and ``stir.safetensors``."""
    spec = profile_spec(profile)
    depth = max([*KS, *TOP_NS])
    rows: dict[str, dict[str, float]] = {}

    tick = time.monotonic()
    raw = rank_chunked(
        eval_set,
        RawPixelEmbedder(spec.input_size, colour=raw_colour),
        depth=depth,
        chunk=chunk,
    )
    rows["raw pixels"] = raw.base.metrics
    rows.update({f"raw pixels, {k}": v for k, v in perfect_rows(raw, TOP_NS).items()})
    timings["eval_raw_pixels_s"] = time.monotonic() - tick
    cmc1 = 100 * raw.base.metrics["cmc@1"]
    log(f"raw pixels: CMC@1 {cmc1:.2f} ({timings['eval_raw_pixels_s']:.0f} s)")

    net = new_embedding_net(spec, seed=seed)
    tick = time.monotonic()
    emb_result = train_embedder(
        net,
        train_set,
        embedder_config,
        validate=None
        if val_set is None or not validate_embedder
        else make_validate_embedder(val_set, precision),
        budget=Budget.of_seconds(None if embedder_minutes is None else embedder_minutes * 60),
        log=log,
        progress=progress,
    )
    timings["train_embedder_s"] = time.monotonic() - tick
    log(f"embedder: {emb_result.steps_done} steps in {timings['train_embedder_s']:.0f} s")

    tick = time.monotonic()
    train_vectors = frozen_embeddings(net, train_set, precision=precision)  # type: ignore[arg-type]
    timings["embed_train_set_s"] = time.monotonic() - tick
    embedder = Embedder(net, device="auto", precision=precision)  # type: ignore[arg-type]
    tick = time.monotonic()
    first = rank_chunked(
        eval_set,
        embedder,
        depth=depth,
        chunk=chunk,
        gallery_vectors=train_vectors if gallery_is_train else None,
    )
    rows["embedder"] = first.base.metrics
    timings["eval_embedder_s"] = time.monotonic() - tick
    log(f"embedder: CMC@1 {100 * first.base.metrics['cmc@1']:.2f}")

    stir_config = StirTrainConfig(
        seed=seed,
        precision=precision,  # type: ignore[arg-type]
        steps=stir_steps,
    )
    val_first = None
    if val_set is not None:
        val_first = rank_chunked(val_set, embedder, depth=depth, chunk=chunk)
        rows_val_embedder = val_first.base.metrics
    tick = time.monotonic()
    stir_net, stir_result = train_stir(
        net,
        train_set,
        stir_config,
        embeddings=train_vectors,
        validate=None if val_first is None else make_validate_stir(val_first, precision, TOP_NS[0]),
        budget=Budget.of_seconds(None if stir_minutes is None else stir_minutes * 60),
        log=log,
        progress=progress,
    )
    timings["train_stir_s"] = time.monotonic() - tick
    # As the retrain command does: after training, validation chooses the fusion weight
    # and the pair order (one way, or the mean of both: StirConfig.symmetric).
    choice: Calibration | None = None
    options: list[Calibration] = []
    if val_first is not None:
        tick = time.monotonic()
        choice, options = choose_scoring(
            stir_net,
            val_first,
            TOP_NS[0],
            precision=precision,  # type: ignore[arg-type]
        )
        timings["choose_scoring_s"] = time.monotonic() - tick
    weight, symmetric = stir_net.config.fusion_weight, stir_net.config.symmetric
    log(
        f"stir: {stir_result.steps_done} steps in {timings['train_stir_s']:.0f} s, "
        f"fusion weight {weight:g}, {'symmetric' if symmetric else 'one way'}"
    )

    if save_models is not None:
        save_models.mkdir(parents=True, exist_ok=True)
        save_embedder(net, save_models / "embedder.safetensors")
        save_stir(stir_net, save_models / "stir.safetensors")
        log(f"saved the embedder and STIR to {save_models}")

    # Both pair orders of every test pair are scored once: the served rows use the rule
    # validation chose, and the lever rows show each rule at its own calibrated weight.
    tick = time.monotonic()
    stir_net.config = replace(stir_net.config, symmetric=False)
    scorer = StirScorer(stir_net, device="auto", precision=precision)  # type: ignore[arg-type]
    size, widest = scorer.info.input_size, max(TOP_NS)
    test_one_way = first.pair_distances(scorer.score_pairs, size, widest)
    test_reverse = first.pair_distances(lambda q, c: scorer.score_pairs(c, q), size, widest)
    test_symmetric = (test_one_way + test_reverse) / 2
    stir_net.config = replace(stir_net.config, symmetric=symmetric)
    timings["eval_stir_s"] = time.monotonic() - tick
    timings["stir_pairs_scored"] = float(2 * len(first.ranked) * widest)
    served = test_symmetric if symmetric else test_one_way
    for top_n in TOP_NS:
        rows[f"embedder + STIR@{top_n}"] = first.rerank_metrics(served, top_n, weight)
    for top_n in TOP_NS:
        rows[f"embedder + STIR@{top_n}, STIR alone"] = first.rerank_metrics(served, top_n, 0.0)
    for key, value in perfect_rows(first, TOP_NS).items():
        rows[f"embedder, {key.replace('perfect', 'perfect reranker')}"] = value
    order_rules: dict[str, Any] = {"served": "symmetric" if symmetric else "one way"}
    for option in options:
        rule = "symmetric" if option.symmetric else "one way"
        order_rules[rule] = {
            "fusion_weight": option.fusion_weight,
            "val_cmc@1": option.rows["cmc@1"],
        }
        for top_n in TOP_NS:
            rows[f"embedder + STIR@{top_n}, {rule} (weight {option.fusion_weight:g})"] = (
                first.rerank_metrics(
                    test_symmetric if option.symmetric else test_one_way,
                    top_n,
                    option.fusion_weight,
                )
            )

    gate: dict[str, Any] = {"decision": "no validation set: no gate"}
    if choice is not None:
        decision = decide(
            GATE,
            choice.rows[GATE.metric],
            rows_val_embedder[GATE.metric],
            what=f"stir at top_n {TOP_NS[0]}",
        )
        gate = decision.to_json()
        log(f"gate on validation: {decision.reason}; pair order rules: {order_rules}")

    training = {
        "embedder": {
            "profile": profile,
            "spec": spec.to_json(),
            "config": embedder_config.resolve(spec).to_json(),
            "result": train_summary(emb_result),
        },
        "stir": {
            "config": stir_config.to_json(),
            "model": stir_net.config.to_json(),
            "result": train_summary(stir_result),
            "init": "from the trained embedder",
            "fusion_weight": weight,
            "pair_order": order_rules,
            "gate_on_validation": gate,
        },
    }
    counts = {
        "n_queries": first.base.n_queries,
        "n_skipped": first.base.n_skipped,
        "n_gallery": len(eval_set.gallery),
        "n_train": len(train_set.labels),
    }
    return rows, training, counts


# ------------------------------------------------------------------------------ output


ROW_ORDER = (
    "raw pixels",
    "embedder",
    "embedder + STIR@5",
    "embedder + STIR@10",
    "embedder + STIR@5, STIR alone",
    "embedder + STIR@10, STIR alone",
    "embedder, perfect reranker@5",
    "embedder, perfect reranker@10",
    "raw pixels, perfect@5",
    "raw pixels, perfect@10",
)


def ordered(rows: dict[str, dict[str, float]]) -> list[str]:
    return [r for r in ROW_ORDER if r in rows] + [r for r in rows if r not in ROW_ORDER]


def table_text(rows: dict[str, dict[str, float]]) -> str:
    width = max(len(r) for r in rows)
    lines = [f"{'model':<{width}}  " + "  ".join(f"{m:>11}" for m in REPORTED)]
    for row in ordered(rows):
        cells = "  ".join(f"{100 * rows[row][m]:>11.2f}" for m in REPORTED)
        lines.append(f"{row:<{width}}  {cells}")
    return "\n".join(lines)


def table_markdown(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| model | " + " | ".join(REPORTED) + " |", "|---" * (len(REPORTED) + 1) + "|"]
    for row in ordered(rows):
        lines.append(
            f"| {row} | " + " | ".join(f"{100 * rows[row][m]:.2f}" for m in REPORTED) + " |"
        )
    return "\n".join(lines)


def write_outputs(out: Path | None, title: str, report: dict[str, Any]) -> None:
    text = table_text(report["rows"])
    print(f"\n{title}")
    for key in ("cpu", "cores", "torch_threads", "date", "git_commit", "command"):
        print(f"{key}: {report['machine'][key]}")
    print(f"counts: {report['counts']}")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items()))
    print("metrics in %\n" + text)
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    machine = report["machine"]
    md = [
        f"# {title}",
        "",
        f"- command: `{machine['command']}`",
        f"- date: {machine['date']}; git commit: {machine['git_commit']}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, torch "
        f"{machine['torch']} with {machine['torch_threads']} threads, "
        f"GPU: {machine['cuda'] or 'none'}",
        f"- counts: {json.dumps(report['counts'])}",
        f"- settings: `{json.dumps(report['settings'])}`",
        "- training: "
        + "; ".join(
            f"{name} {t['result']['steps_done']} steps ({t['result']['stopped_by']}, "
            f"{t['result']['seconds']:.0f} s)"
            for name, t in report["training"].items()
        ),
        f"- STIR fusion weight (calibrated on validation): "
        f"{report['training']['stir'].get('fusion_weight')}; pair order: "
        f"{json.dumps(report['training']['stir'].get('pair_order'))}; gate on validation: "
        f"{report['training']['stir'].get('gate_on_validation', {}).get('reason', 'none')}",
        "- timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items()),
        "",
        "Metrics in %. `perfect reranker@n`: the first stage's top n with every relevant item "
        "first (CMC@1 = the first stage's CMC@n).",
        "",
        table_markdown(report["rows"]),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def common_arguments(
    parser: argparse.ArgumentParser, *, embedder_minutes: float, stir_minutes: float
) -> None:
    """The options both quality benchmarks take; the two budgets add up to the issue's
    limit of 20 training minutes per benchmark."""
    parser.add_argument(
        "--embedder-minutes",
        type=float,
        default=embedder_minutes,
        help="embedder training budget, minutes",
    )
    parser.add_argument(
        "--stir-minutes", type=float, default=stir_minutes, help="STIR training budget, minutes"
    )
    parser.add_argument(
        "--embedder-steps",
        type=int,
        help="train the embedder exactly this many steps, with no time budget (replaces "
        "--embedder-minutes): a run that repeats exactly",
    )
    parser.add_argument(
        "--stir-steps",
        type=int,
        help="train STIR exactly this many steps, with no time budget (replaces --stir-minutes)",
    )
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=PROFILE,
        help="embedder profile (its input size); STIR is built from the same network",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--chunk", type=int, default=1000, help="queries per brute-force block")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--save-models",
        type=Path,
        help="save the trained embedder and STIR here (embedder.safetensors, stir.safetensors)",
    )


def check_steps(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("embedder_steps", "stir_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def sop_set(pixels: np.ndarray, labels: np.ndarray, size: int) -> ArrayEvalSet:
    """The SOP protocol's set: every photo queries all the others (its own gallery
    position excluded); ``pixels`` at the load size, resized here to ``size``."""
    at_size = resize_pixels(pixels, size)
    return ArrayEvalSet(labels, labels, np.arange(len(labels)), {size: (at_size, at_size)})


def compare(
    args: argparse.Namespace,
    *,
    train_set: TrainSet,
    eval_set: EvalSet,
    val_set: EvalSet | None,
    timings: dict[str, float],
    embedder_config: EmbedderTrainConfig | None = None,
    gallery_is_train: bool = False,
    validate_embedder: bool = True,
    raw_colour: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, Any], dict[str, Any]]:
    """:func:`run_comparison` with what :func:`common_arguments` parsed (budgets or step
    counts, seed, precision, profile, chunk, progress, where to save the models)."""
    return run_comparison(
        train_set=train_set,
        eval_set=eval_set,
        val_set=val_set,
        **budgets(args),
        stir_steps=args.stir_steps,
        seed=args.seed,
        precision=args.precision,
        chunk=args.chunk,
        gallery_is_train=gallery_is_train,
        timings=timings,
        progress=not args.no_progress,
        embedder_config=embedder_config
        or EmbedderTrainConfig(seed=args.seed, precision=args.precision, steps=args.embedder_steps),
        validate_embedder=validate_embedder,
        profile=args.profile,
        raw_colour=raw_colour,
        save_models=args.save_models,
    )


def run_settings(args: argparse.Namespace, size: int, load: int) -> dict[str, Any]:
    """What every benchmark's report records of how it trained and evaluated."""
    return {
        **budgets(args),
        "embedder_steps": args.embedder_steps,
        "stir_steps": args.stir_steps,
        "seed": args.seed,
        "precision": args.precision,
        "profile": args.profile,
        "input_size": size,
        "load_size": load,
        "top_ns": list(TOP_NS),
        "args": {k: str(v) for k, v in vars(args).items()},
    }


def budgets(args: argparse.Namespace) -> dict[str, Any]:
    """The training budgets as run_comparison takes them and the report records them:
    minutes, or None where an exact step count replaces them."""
    return {
        "embedder_minutes": None if args.embedder_steps else args.embedder_minutes,
        "stir_minutes": None if args.stir_steps else args.stir_minutes,
    }


def timed(timings: dict[str, float], name: str) -> Callable[[], None]:
    start = time.monotonic()

    def stop() -> None:
        timings[name] = time.monotonic() - start

    return stop
