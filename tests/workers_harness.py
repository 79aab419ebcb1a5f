"""Real processes for the worker tests: a private Redis server and Celery workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import redis

from workers.command import worker_command

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A throw-away redis-server on a free port: tests may stop and restart it freely."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def cli_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEARCHSVC_")}
    env.update({"SEARCHSVC_HOME": str(home), "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def start_worker(
    env: Mapping[str, str],
    queue: str,
    name: str,
    *,
    pool: str = "solo",
    concurrency: int = 1,
    app: str = "workers",
) -> subprocess.Popen[bytes]:
    """A `celery worker` in its own session. Its log goes to ``worker-NAME.log`` beside
    SEARCHSVC_HOME, so that a failing test leaves the workers' side of the story. ``app``
    ``gated_worker`` (this folder) is the worker that pauses after its first task."""
    log_path = Path(env["SEARCHSVC_HOME"]).parent / f"worker-{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = worker_command(
        queue, name, "--pool", pool, "--concurrency", str(concurrency), log_level="info", app=app
    )
    env = dict(env)
    if app != "workers":  # a test app lives beside this file
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH", "")])
        )
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            command,
            env=dict(env),
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def ctrl_c_as_at_a_terminal() -> None:
    """``preexec_fn`` of a child the tests interrupt with SIGINT, as a user's Ctrl-C would.

    A shell starts a background job with SIGINT ignored, the ignoring survives ``exec``, and
    Python installs no KeyboardInterrupt handler for a signal ignored at its start (so that
    ``nohup``-style launches stay immune). A test runner started in the background (a CI
    script's ``&``) would pass that on to every child, and the Ctrl-C tests would then wait
    on a command that never hears them; a terminal's foreground job has the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def searchsvc(env: Mapping[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "searchsvc.cli", *args],
        env=dict(env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=ctrl_c_as_at_a_terminal,
    )
