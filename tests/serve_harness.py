"""A real `searchsvc serve` process on a loopback port, for the service's tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"


def service_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEARCHSVC_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "SEARCHSVC_HOME": str(home),
            "SEARCHSVC_TORCH_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra or {})
    return env


def cli(home: Path, *args: str, extra: Mapping[str, str] | None = None) -> str:
    """One `searchsvc` command in its own process, as a user in another terminal runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "searchsvc.cli", *args],
        env=service_env(home, extra),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    log: Path

    def client(self, key: str | None = WRITE_KEY, timeout: float = 60.0) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self.log.read_text()
                if client.get("/readyz").status_code == 200:
                    return
                time.sleep(0.3)
        raise AssertionError(f"server not ready in {timeout_s} s:\n{self.log.read_text()}")


@contextmanager
def running_server(
    home: Path, extra: Mapping[str, str] | None = None, *, ready: bool = True
) -> Iterator[Server]:
    """`searchsvc serve --port 0` on its own: the address it announces in the home."""
    announced = home / "server.json"
    announced.unlink(missing_ok=True)
    log = home.parent / f"serve-{home.name}.log"
    home.mkdir(parents=True, exist_ok=True)
    handle = log.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "searchsvc.cli", "serve", "--port", "0"],
        env=service_env(home, extra),
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not announced.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no address announced:\n{log.read_text()}"
            time.sleep(0.1)
        server = Server(process, json.loads(announced.read_text())["url"], log)
        if ready:
            server.wait_ready()
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        handle.close()
