"""One owner of an embedded store: a running ``searchsvc serve`` announces its address in
the home, and the CLI's commands find it and go through its API instead of opening the
store (which one process only may hold).

Standard library only (urllib): the CLI reaches a server without importing the web stack.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searchsvc.core.config import Settings
from searchsvc.core.errors import SearchsvcError

SERVER_FILE = "server.json"


def announce(home: Path, url: str) -> None:
    """Record that this process serves ``home`` at ``url`` (atomically replaced)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / SERVER_FILE
    tmp = home / f".{SERVER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n", encoding="utf-8")
    tmp.replace(path)


def withdraw(home: Path) -> None:
    """Remove the announcement if it is still this process's."""
    path = home / SERVER_FILE
    try:
        if json.loads(path.read_text("utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LocalServer:
    url: str
    key: str | None

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float | None
    ) -> Any:
        """One JSON call; an error answer becomes a SearchsvcError with its reasons."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.key:
            request.add_header("X-API-Key", self.key)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                errors = json.loads(exc.read()).get("errors", [])
                reasons = "; ".join(
                    (f"{e['field']}: " if e.get("field") else "") + str(e["reason"]) for e in errors
                )
            except (ValueError, AttributeError, KeyError, TypeError):
                reasons = ""
            raise SearchsvcError(
                f"server {self.url} answered {exc.code}: {reasons or exc.reason}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise SearchsvcError(f"server {self.url} did not answer ({exc})") from None


def find_local_server(settings: Settings) -> LocalServer | None:
    """The live server that owns this home's embedded store, or None (a stale announcement
    of a process that died is ignored)."""
    if settings.qdrant_url:
        return None  # a Qdrant server: every process opens the index itself
    try:
        record = json.loads((settings.home / SERVER_FILE).read_text("utf-8"))
        url, pid = str(record["url"]), int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(pid):
        return None
    scopes = settings.api_key_scopes
    key = next((k for k, s in scopes.items() if s == "write"), next(iter(scopes), None))
    server = LocalServer(url, key)
    try:
        server.call("GET", "/healthz", timeout=2.0)
    except SearchsvcError:
        return None
    return server


def switch_through(server: LocalServer) -> Callable[[int, Callable[[int, int], None] | None], Any]:
    """A retrain's embedder switch sent to the server that owns the store (its progress
    callback is not called: the server reports only the outcome)."""

    def switch(version_id: int, progress: Callable[[int, int], None] | None = None) -> Any:
        from searchsvc.jobs.switch import SwapReport

        answer = server.call(
            "POST", "/v1/admin/switch-embedder", {"version_id": version_id}, timeout=None
        )
        return SwapReport(**answer)

    return switch
