"""What the benchmarks print about the machine and the code they ran on (stdlib only: a
benchmark imports it before torch where it must).

Benchmarks run as ``python benchmarks/<script>.py``, so this folder is on ``sys.path``
and ``from machine import ...`` finds this module.
"""

from __future__ import annotations

import platform
import resource
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The speed benchmarks of the serving paths (serve, churn, load, rerank, scale) pin the profile
# their records were made at, so that a change of the product's default profile does not
# silently change what a "small profile" report measured. The cost of another profile is
# measured side by side on its own (benchmarks/results/profile_cost/).
SPEED_PROFILE = {"SEARCHSVC_EMBEDDER_PROFILE": "small"}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    """The short commit of the checkout, marked when tracked files differ from it."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout.strip()
        return out.stdout.strip() + (" (tracked files modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
