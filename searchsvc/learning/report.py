"""An HTML report of retrieval quality that people can look at (``searchsvc eval --report``).

One self-contained page (``index.html``; every picture is a PNG data URI, every chart an
inline SVG, no script), so it opens offline and can be mailed as one file:

- for a sample of queries, the query photo beside its top 5 before and after STIR, the
  right product marked (green frame; red for a wrong one). The sample is drawn by a fixed
  rule before any result is seen: ``sample`` queries by a seeded draw without replacement
  among the queries that have something to find, shown in their set order;
- CMC@k for k = 1..depth, the embedder against embedder + the active STIR;
- the fusion-weight calibration curve: CMC@1 after STIR at each weight the retrain's
  calibration tries, with the weight the served model carries marked.

Pictures are the pixels the models see (the pixel store's copies at the model's input
size; query photos decoded through the one safe path), shown enlarged.

Ranking, reranking and fusion are the evaluation's and the query path's own
(:class:`~searchsvc.learning.evaluation.FirstStageResult`,
:func:`searchsvc.models.fusion.rerank_order`).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from searchsvc.learning.evaluation import (
    FUSION_WEIGHTS,
    EvalSet,
    FirstStageResult,
    rank_eval_set,
    relevance_at,
)
from searchsvc.models.embedder import Embedder
from searchsvc.models.fusion import rerank_order
from searchsvc.models.stir import StirScorer

SHOWN = 5
"""Results shown per query, before and after STIR."""
DEPTH = 10
"""CMC@k is drawn for k = 1..DEPTH."""


@dataclass(frozen=True)
class Example:
    """One sampled query: its position in the set, its product, the gallery positions of
    its first results before and (with a reranker) after STIR."""

    query: int
    label: str
    before: list[int]
    after: list[int] | None


@dataclass
class QualityReport:
    title: str
    source: str
    models: dict[str, str]
    n_queries: int
    n_gallery: int
    top_n: int
    cmc_embedder: list[float]
    cmc_stir: list[float] | None
    calibration: list[tuple[float, float]] | None
    """(fusion weight, CMC@1 after STIR at top_n) for every weight calibration tries."""
    served_weight: float | None
    examples: list[Example]
    gallery_labels: list[str]
    query_pixels: dict[int, np.ndarray] = field(default_factory=dict)
    gallery_pixels: dict[int, np.ndarray] = field(default_factory=dict)


def sample_queries(result: FirstStageResult, sample: int, seed: int) -> list[int]:
    """The fixed rule: ``sample`` queries drawn without replacement by ``seed`` among those
    with a relevant gallery item, in set order. Results play no part in it."""
    candidates = np.flatnonzero(result.n_relevant > 0)
    if len(candidates) <= sample:
        return [int(q) for q in candidates]
    rng = np.random.default_rng(seed)
    return sorted(int(q) for q in rng.choice(candidates, sample, replace=False))


def cmc_curve(result: FirstStageResult, ranked: np.ndarray, depth: int) -> list[float]:
    """CMC@k for k = 1..depth over the queries with something to find."""
    scored = result.n_relevant > 0
    rel = relevance_at(result.gallery_labels[ranked], result.query_labels, depth)[scored]
    if not len(rel):
        return [0.0] * depth
    return [float(v) for v in np.cumsum(rel, axis=1).astype(bool).mean(axis=0)]


def build_report(
    eval_set: EvalSet,
    embedder: Embedder,
    stir: StirScorer | None,
    *,
    title: str,
    source: str,
    models: dict[str, str],
    top_n: int,
    sample: int = 12,
    seed: int = 0,
    batch_size: int = 64,
) -> QualityReport:
    """Rank the set with ``embedder``, rerank the first ``top_n`` with ``stir`` (its own
    fusion weight, as served), and gather what the page shows."""
    result = rank_eval_set(eval_set, embedder, depth=max(DEPTH, top_n), batch_size=batch_size)
    depth = min(DEPTH, result.ranked.shape[1])
    cmc_embedder = cmc_curve(result, result.ranked, depth)
    cmc_stir = calibration = served_weight = None
    after_ranked: np.ndarray | None = None
    if stir is not None:
        size = stir.info.input_size
        pairs = result.pair_distances(stir.score_pairs, size, top_n)
        n = pairs.shape[1]
        served_weight = stir.info.fusion_weight
        order = rerank_order(result.distances, pairs, n, served_weight)
        after_ranked = np.take_along_axis(result.ranked, order, axis=1)
        cmc_stir = cmc_curve(result, after_ranked, depth)
        calibration = [
            (weight, result.rerank_metrics(pairs, n, weight)["cmc@1"])
            for weight in sorted({*FUSION_WEIGHTS, served_weight})
        ]
    chosen = sample_queries(result, sample, seed)
    examples = [
        Example(
            query=q,
            label=result.query_labels[q],
            before=[int(g) for g in result.ranked[q, :SHOWN]],
            after=None if after_ranked is None else [int(g) for g in after_ranked[q, :SHOWN]],
        )
        for q in chosen
    ]
    gallery_px, query_px = eval_set.pixels(embedder.info.input_size)
    shown = {g for e in examples for g in [*e.before, *(e.after or [])]}
    return QualityReport(
        title=title,
        source=source,
        models=dict(models),
        n_queries=result.base.n_queries,
        n_gallery=len(eval_set.gallery),
        top_n=top_n,
        cmc_embedder=cmc_embedder,
        cmc_stir=cmc_stir,
        calibration=calibration,
        served_weight=served_weight,
        examples=examples,
        gallery_labels=[str(label) for label in result.gallery_labels],
        query_pixels={e.query: query_px[e.query] for e in examples},
        gallery_pixels={g: gallery_px[g] for g in sorted(shown)},
    )


def showcase_lines(report: QualityReport, eval_set: EvalSet) -> list[str]:
    """The sampled queries as text: each one's photo, its product, and its top 5 before
    and after STIR, a right product marked ``*``; then how many were right at rank 1."""

    def listed(ranked: Sequence[int], label: str) -> str:
        names = [report.gallery_labels[g] for g in ranked]
        return " ".join(f"{name}{'*' if name == label else ''}" for name in names)

    lines = [
        f"{len(report.examples)} sampled queries (a seeded draw, made before any result is "
        f"seen); top {SHOWN} results, * = the right product:"
    ]
    right = {"embedder": 0, "stir": 0}
    for example in report.examples:
        photo = eval_set.queries[example.query].path.name
        lines.append(f"  {photo} (product {example.label})")
        lines.append(f"    embedder:    {listed(example.before, example.label)}")
        right["embedder"] += report.gallery_labels[example.before[0]] == example.label
        if example.after is not None:
            lines.append(f"    + STIR@{report.top_n}:  {listed(example.after, example.label)}")
            right["stir"] += report.gallery_labels[example.after[0]] == example.label
    summary = f"right at rank 1: embedder {right['embedder']}/{len(report.examples)}"
    if report.cmc_stir is not None:
        summary += f", with STIR {right['stir']}/{len(report.examples)}"
    return [*lines, summary]


# --------------------------------------------------------------------------- rendering


def png_data_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def line_chart(
    series: Sequence[tuple[str, str, Sequence[float]]],
    x_labels: Sequence[str],
    *,
    x_title: str,
    y_title: str,
    marker: int | None = None,
    marker_text: str = "",
    width: int = 520,
    height: int = 320,
) -> str:
    """An inline SVG line chart: ``series`` of (name, colour, values in [0, 1]) over the
    ``x_labels`` positions, y in percent from the data's floor (rounded down to 10) to 100;
    ``marker`` draws a dashed vertical line at that position."""
    left, right, bottom = 56, 16, 48
    top = 12 + 16 * len(series)  # the legend sits above the plot, clear of the curves
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for _, _, vals in series for v in vals]
    floor = min(90.0, 10 * np.floor(100 * min(values, default=0.0) / 10))
    steps = max(len(x_labels) - 1, 1)

    def x(i: int) -> float:
        return left + plot_w * i / steps

    def y(v: float) -> float:
        return top + plot_h * (1 - (100 * v - floor) / (100 - floor))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#ccc"/>',
    ]
    span = 100 - floor
    step = 10 if span >= 50 else 5 if span >= 20 else 2
    for tick in np.arange(floor, 100 + step / 2, step):
        ty = y(tick / 100)
        parts.append(
            f'<line x1="{left}" y1="{ty:.1f}" x2="{left + plot_w}" y2="{ty:.1f}" stroke="#e4e4e4"/>'
            f'<text x="{left - 6}" y="{ty + 4:.1f}" font-size="11" text-anchor="end">'
            f"{tick:.0f}</text>"
        )
    for i, label in enumerate(x_labels):
        parts.append(
            f'<text x="{x(i):.1f}" y="{top + plot_h + 16}" font-size="11" '
            f'text-anchor="middle">{html.escape(label)}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 8}" font-size="12" '
        f'text-anchor="middle">{html.escape(x_title)}</text>'
        f'<text x="14" y="{top + plot_h / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">{html.escape(y_title)}</text>'
    )
    if marker is not None:
        mx = x(marker)
        parts.append(
            f'<line x1="{mx:.1f}" y1="{top}" x2="{mx:.1f}" y2="{top + plot_h}" stroke="#888" '
            f'stroke-dasharray="4 3"/><text x="{mx + 4:.1f}" y="{top + 12}" font-size="11">'
            f"{html.escape(marker_text)}</text>"
        )
    for n, (name, colour, vals) in enumerate(series):
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(vals))
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>'
        )
        for i, v in enumerate(vals):
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>')
        ly = 14 + 16 * n
        parts.append(
            f'<rect x="{left}" y="{ly - 5}" width="12" height="3" fill="{colour}"/>'
            f'<text x="{left + 18}" y="{ly}" font-size="12">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
.charts { display: flex; gap: 32px; flex-wrap: wrap; }
table.examples { border-collapse: collapse; }
table.examples td { padding: 4px 6px; vertical-align: top; text-align: center; font-size: 11px; }
table.examples td.label { text-align: left; font-size: 12px; white-space: nowrap; }
img.thumb { width: 72px; height: 72px; image-rendering: pixelated; border: 4px solid #ccc; }
img.right { border-color: #1a9c3c; } img.wrong { border-color: #d33; }
img.query { border-color: #3561c9; }
.sep { border-left: 2px solid #999; }
p.note { color: #555; font-size: 13px; max-width: 900px; }
"""


def _thumb(pixels: np.ndarray, css: str, caption: str) -> str:
    return (
        f'<img class="thumb {css}" src="{png_data_uri(pixels)}" alt="{html.escape(caption)}" '
        f'title="{html.escape(caption)}"><br>{html.escape(caption)}'
    )


def render_html(report: QualityReport) -> str:
    models = ", ".join(f"{k} {v}" for k, v in report.models.items()) or "none"
    has_stir = report.cmc_stir is not None
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(report.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(report.title)}</h1>",
        f'<p class="note">{html.escape(report.source)}: {report.n_queries} queries with a '
        f"right answer, gallery {report.n_gallery} images; models: {html.escape(models)}. "
        + (
            f"STIR reranks the first {report.top_n} at fusion weight "
            f"{report.served_weight:g}, as served."
            if has_stir
            else "No reranker is active: only the embedder's results are shown."
        )
        + "</p>",
        "<h2>CMC@k</h2>",
        '<div class="charts">',
    ]
    depth = len(report.cmc_embedder)
    series = [("embedder", "#3561c9", report.cmc_embedder)]
    if report.cmc_stir is not None:
        series.append((f"embedder + STIR@{report.top_n}", "#e07b00", report.cmc_stir))
    out.append(
        line_chart(
            series,
            [str(k) for k in range(1, depth + 1)],
            x_title="k (results looked at)",
            y_title="CMC@k, % of queries",
        )
    )
    if report.calibration is not None:
        weights = [w for w, _ in report.calibration]
        served = weights.index(report.served_weight) if report.served_weight in weights else None
        out.append(
            line_chart(
                [
                    (f"STIR@{report.top_n} CMC@1", "#e07b00", [v for _, v in report.calibration]),
                    ("embedder CMC@1", "#3561c9", [report.cmc_embedder[0]] * len(weights)),
                ],
                [f"{w:g}" for w in weights],
                x_title="fusion weight (0: STIR alone; larger: closer to the first stage)",
                y_title="CMC@1, %",
                marker=served,
                marker_text="served",
            )
        )
    out.append("</div>")
    cells = ["<tr><th>", "<th>query</th>"] + [
        f"<th>embedder #{r}</th>" for r in range(1, SHOWN + 1)
    ]
    if has_stir:
        cells += [f"<th>STIR #{r}</th>" for r in range(1, SHOWN + 1)]
    out += [
        "<h2>Sampled queries</h2>",
        f'<p class="note">{len(report.examples)} queries drawn by a seeded rule before any '
        "result was seen (not chosen by outcome). Green: an image of the right product; red: "
        "another product. Pictures are the models' input pixels, enlarged.</p>",
        '<table class="examples">',
        "".join(cells) + "</tr>",
    ]
    for example in report.examples:
        row = [
            f'<tr><td class="label">product<br><b>{html.escape(example.label)}</b></td>',
            f"<td>{_thumb(report.query_pixels[example.query], 'query', 'query')}</td>",
        ]
        for name, ranked in (("before", example.before), ("after", example.after)):
            if ranked is None:
                continue
            for n, g in enumerate(ranked):
                label = report.gallery_labels[g]
                css = "right" if label == example.label else "wrong"
                sep = ' class="sep"' if name == "after" and n == 0 else ""
                row.append(f"<td{sep}>{_thumb(report.gallery_pixels[g], css, label)}</td>")
        out.append("".join(row) + "</tr>")
    out += ["</table>", "</body></html>"]
    return "\n".join(out)


def write_report(report: QualityReport, out_dir: Path) -> Path:
    """Write ``out_dir/index.html`` (created if needed); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "index.html"
    page.write_text(render_html(report), encoding="utf-8")
    return page
