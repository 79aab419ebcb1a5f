"""Training state on disk, for resuming after a crash: safetensors + JSON, never pickle.

One file holds the model's weights (``model.*``), the best weights so far (``best.*``) and
the optimizer's tensors (``optim.<param>.<name>``); its JSON holds the progress (step,
epoch, plan, history) and the optimizer's non-tensor state. Written atomically
(:func:`searchsvc.models.checkpoint.save_checkpoint`): a crash leaves the previous state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from searchsvc.core.errors import ModelError
from searchsvc.models.checkpoint import config_path_for, load_checkpoint, save_checkpoint

STATE_KIND = "training-state"


def save_state(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None,
    progress: dict[str, Any],
) -> None:
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    if best is not None:
        tensors.update({f"best.{k}": v for k, v in best.items()})
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optim["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    config = {
        "kind": STATE_KIND,
        "progress": progress,
        "optimizer": {"param_groups": optim["param_groups"], "scalars": scalars},
    }
    save_checkpoint(path, tensors, config)


def load_state(
    path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Restore ``model`` (and ``optimizer``) from ``path``; returns (best weights, progress)."""
    tensors, config = load_checkpoint(path)
    _check_kind(path, config)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    if optimizer is not None:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, values in config["optimizer"]["scalars"].items():
            state.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict(
            {"state": state, "param_groups": config["optimizer"]["param_groups"]}
        )
    return best, dict(config["progress"])


def saved_progress(path: Path) -> dict[str, Any]:
    """The progress of the state at ``path``, read from its JSON alone: what a loop must
    know before it can restore the state (STIR's phase decides which optimizer the saved
    optimizer state belongs to), without reading the weights twice."""
    config_file = config_path_for(path)
    if not config_file.is_file():
        raise ModelError(f"{path}: its config {config_file.name} is missing")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file}: not a valid model config ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file}: not a valid model config (not a JSON object)")
    _check_kind(path, config)
    return dict(config["progress"])


def _check_kind(path: Path, config: dict[str, Any]) -> None:
    if config.get("kind") != STATE_KIND:
        raise ModelError(f"{path}: not a training state (kind={config.get('kind')!r})")
