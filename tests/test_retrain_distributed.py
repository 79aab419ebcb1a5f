"""``torchrun --nproc_per_node 2 -m trainer.retrain``: two CPU processes (gloo) train the
embedder with DistributedDataParallel; rank 0 alone evaluates, gates, records and
promotes. On the demo catalog (Fashion-MNIST articles) the result beats the random-init
embedder and passes the gate."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from searchsvc.app import App
from searchsvc.core.config import load_settings
from searchsvc.core.profiles import PROFILES
from searchsvc.jobs.model_files import register_version
from searchsvc.learning.datasets import DEBIAN_DIR, write_demo_catalog
from searchsvc.models.embedder import new_embedding_net, save_embedder
from searchsvc.storage.db import ModelKind, ModelVersion
from searchsvc.storage.versions import active_version

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
        reason="dataset-fashion-mnist not installed",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
SPEC = dataclasses.replace(
    PROFILES["small"], timm_kwargs={**PROFILES["small"].timm_kwargs, "depth": 2}
)


def test_two_process_ddp_retrain_passes_the_gate_and_rank_0_alone_records(
    tmp_path: Path,
) -> None:
    env_vars = {"SEARCHSVC_HOME": str(tmp_path / "home"), "SEARCHSVC_VAL_FRACTION": "0.3"}
    settings = load_settings(env=env_vars)
    catalog, _ = write_demo_catalog(
        tmp_path / "demo", products=100, views=3, seed=0, cache_dir=tmp_path / "cache"
    )
    app = App(settings)
    try:
        first = tmp_path / "random-init.safetensors"
        save_embedder(new_embedding_net(SPEC, seed=0), first)
        random_init = register_version(
            app.db, settings, ModelKind.EMBEDDER, first, activate=True, notes="random init"
        )
        app.ingest(catalog)
    finally:
        app.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith("SEARCHSVC_")}
    env.update(env_vars, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [
            str(TORCHRUN),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "trainer.retrain",
            "--only",
            "embedder",
            "--embedder-steps",
            "30",
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    report = json.loads(done.stdout[done.stdout.index("{") :])  # rank 0's report, alone
    stage = report["stages"]["embedder"]
    assert stage["decision"]["passed"] is True, stage
    assert stage["promoted"] is True
    gain = stage["decision"]["candidate"] - stage["decision"]["baseline"]
    assert gain >= 0.05, stage["decision"]

    app = App(settings)
    try:
        active = active_version(app.db, ModelKind.EMBEDDER)
        with app.db.session() as session:
            versions = session.scalars(select(ModelVersion)).all()
            training = next(v for v in versions if v.id == active.id).config["training"]  # type: ignore[union-attr]
    finally:
        app.close()
    assert active is not None and active.id != random_init
    assert len(versions) == 2  # one candidate recorded: rank 1 wrote nothing
    assert training["result"]["steps_done"] == 30
    # Each of the 30 steps ran one balanced batch per process.
    assert not list((tmp_path / "home" / "retrain").glob("run-*-rank1"))
