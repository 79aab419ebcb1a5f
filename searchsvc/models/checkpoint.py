"""Model files: weights in safetensors (no pickle), config in a JSON file beside them.

``model.safetensors`` + ``model.json``. The JSON says what the weights are (kind, spec), so a
file can be loaded without knowing how it was made.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from searchsvc.core.errors import ModelError
from searchsvc.core.files import config_path_for


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write weights and config atomically (a crash leaves the old pair or none, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
    for target, writer in (
        (path, lambda tmp: save_file(tensors, tmp)),
        (config_path_for(path), lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2))),
    ):
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{target.name}.")
        os.close(fd)
        try:
            writer(tmp_name)
            os.replace(tmp_name, target)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read weights (safetensors only) and their JSON config; errors name the file."""
    config_file = config_path_for(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if not config_file.is_file():
        raise ModelError(f"{path}: its config {config_file.name} is missing")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file}: not a valid model config ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file}: not a valid model config (not a JSON object)")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a valid safetensors file ({exc})") from None
    return state, config
