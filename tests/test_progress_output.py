"""Progress bars only on a terminal: a log file or a pipe gets the summary lines, never a
bar's carriage-return frames."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from catalog_factory import GeneratedCatalog
from tqdm import tqdm

from searchsvc.core.progress import bar_disabled

REPO = Path(__file__).resolve().parents[1]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_draws_on_a_terminal_and_not_into_a_file() -> None:
    for stream, drawn in ((FakeTerminal(), True), (io.StringIO(), False)):
        with tqdm(total=3, file=stream, disable=bar_disabled(True), mininterval=0) as bar:
            for _ in range(3):
                bar.update(1)
        assert ("\r" in stream.getvalue()) is drawn
    unwanted = FakeTerminal()
    with tqdm(total=3, file=unwanted, disable=bar_disabled(False)) as bar:
        bar.update(3)
    assert unwanted.getvalue() == ""


def test_ingest_into_a_pipe_prints_its_summary_without_a_bar(
    catalog: GeneratedCatalog, tmp_path: Path
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SEARCHSVC_")},
        "SEARCHSVC_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from searchsvc.cli import main; main()",
            "ingest",
            str(catalog.root),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "\r" not in done.stderr and "\r" not in done.stdout
    assert "ingest:" not in done.stderr  # tqdm's "ingest: 100%|...": no bar at all
    assert "36" in done.stdout, done.stdout  # the summary: 12 products x 3 images
