"""File layouts every layer agrees on."""

from __future__ import annotations

from pathlib import Path


def config_path_for(weights_path: Path) -> Path:
    """A model file's JSON config lies beside its weights (``x.safetensors`` + ``x.json``)."""
    return weights_path.with_suffix(".json")
