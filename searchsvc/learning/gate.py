"""The promotion gate and the record every candidate leaves.

The gate is a pure comparison on the same validation split: a candidate is promoted only
when the configured metric beats what serves now by the configured margin. Every candidate
is registered as a model version, promoted or not, with its metrics, the gate's decision,
its data counts, seeds and duration, so a refused model can be inspected later.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from searchsvc.core.config import Settings
from searchsvc.core.errors import SearchsvcError
from searchsvc.jobs.model_files import register_version
from searchsvc.learning.evaluation import REPORTED
from searchsvc.storage.db import Database, ModelKind
from searchsvc.storage.versions import merge_config


@dataclass(frozen=True)
class Gate:
    """Promote only when ``metric`` improves on what serves by at least ``margin``
    (absolute, metrics are in [0, 1]); a margin of 0 still needs a strict improvement."""

    metric: str = "cmc@1"
    margin: float = 0.01

    def __post_init__(self) -> None:
        if self.metric not in REPORTED:
            raise SearchsvcError(
                f"gate metric {self.metric!r}: expected one of {', '.join(REPORTED)}"
            )
        if not math.isfinite(self.margin) or not 0.0 <= self.margin < 1.0:
            raise SearchsvcError(f"gate margin must be in [0, 1), got {self.margin}")


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    metric: str
    candidate: float
    baseline: float
    margin: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(gate: Gate, candidate: float, baseline: float, *, what: str) -> GateDecision:
    """Compare one number of the candidate with the same number of what serves now."""
    gain = candidate - baseline
    passed = bool(gain >= gate.margin and gain > 0)
    verdict = "promoted" if passed else "kept out of service"
    reason = (
        f"{what}: {gate.metric} {100 * candidate:.2f} vs {100 * baseline:.2f} serving "
        f"({100 * gain:+.2f} points, margin {100 * gate.margin:.2f}): {verdict}"
    )
    return GateDecision(passed, gate.metric, candidate, baseline, gate.margin, reason)


def record_candidate(
    db: Database,
    settings: Settings,
    kind: ModelKind,
    file: Path,
    *,
    metrics: dict[str, Any],
    training: dict[str, Any],
    notes: str,
) -> int:
    """Register ``file`` as an inactive version carrying its evaluation (``metrics``) and
    how it was made (``training``: data counts, split, seeds, settings, duration)."""
    version_id = register_version(db, settings, kind, file, metrics=metrics, notes=notes)
    merge_config(db, version_id, training=training)
    return version_id
