"""docker-compose.yml, checked without a Docker engine: services, commands, healthchecks,
and every setting the code reads, set for every searchsvc service and valid."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from searchsvc.core.config import ENV_PREFIX, Settings, load_settings

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
APP_SERVICES = ("migrate", "embed-worker", "rerank-worker", "api", "cli")
_DEFAULTED = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):-(?P<default>.*)\}$")
_REQUIRED = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):\?(?P<message>.*)\}$")
EXAMPLE_API_KEYS = "compose-example-key-0001:write"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def resolved(value: Any) -> str:
    """The value compose would use with no variables set: the ${VAR:-default} default; a
    ${VAR:?message} (compose refuses to start without it) as an example value."""
    text = str(value)
    if _REQUIRED.match(text):
        return EXAMPLE_API_KEYS
    match = _DEFAULTED.match(text)
    return match.group("default") if match else text


def test_services_and_their_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"redis", "qdrant", "postgres", *APP_SERVICES}
    for infra in ("redis", "qdrant", "postgres"):
        assert "healthcheck" in services[infra], infra
    assert services["migrate"]["command"] == ["searchsvc", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"

    embed = services["embed-worker"]["command"]
    assert embed[:4] == ["celery", "-A", "workers", "worker"]
    assert embed[embed.index("-Q") + 1] == "embed"
    rerank = services["rerank-worker"]["command"]
    assert rerank[rerank.index("-Q") + 1] == "rerank"
    # One process per GPU: a thread pool (or solo), never a prefork pool of processes.
    assert rerank[rerank.index("--pool") + 1] in {"threads", "solo"}
    devices = services["rerank-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["rerank-worker"]["environment"]["SEARCHSVC_DEVICE"] == "cuda"
    api = services["api"]
    assert api["command"][:2] == ["searchsvc", "serve"]
    assert api["command"][api["command"].index("--host") + 1] == "0.0.0.0"
    probe = " ".join(api["healthcheck"]["test"])
    assert "/readyz" in probe  # healthy means ready to answer, not only alive
    assert api["depends_on"]["qdrant"]["condition"] == "service_healthy"
    for worker in ("embed-worker", "rerank-worker", "api"):
        needs = services[worker]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_every_setting_is_set_and_valid(compose: dict[str, Any], service: str) -> None:
    environment = compose["services"][service]["environment"]
    settings_env = {k: resolved(v) for k, v in environment.items() if k.startswith(ENV_PREFIX)}
    read_by_code = {
        ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings) if f.name != "config_file"
    }
    assert set(settings_env) == read_by_code, (
        f"missing: {read_by_code - set(settings_env)}, unknown: {set(settings_env) - read_by_code}"
    )
    settings = load_settings(env={k: v for k, v in settings_env.items() if v != ""})
    # The cluster shape: servers, not embedded stores.
    assert settings.database_url.startswith("postgresql://")
    assert settings.qdrant_url.startswith("http://qdrant:")
    assert settings.broker_url.startswith("redis://redis:")
    assert settings.workers_write_index
    assert str(settings.media_dir) == "/data/media"


def test_services_share_home_and_media(compose: dict[str, Any]) -> None:
    for service in APP_SERVICES:
        volumes = compose["services"][service]["volumes"]
        assert "searchsvc-data:/data" in volumes, service


def _has_credential(service: dict[str, Any]) -> bool:
    environment = service.get("environment") or {}
    command = " ".join(map(str, service.get("command") or []))
    return bool(
        resolved(environment.get("QDRANT__SERVICE__API_KEY", ""))
        or _REQUIRED.match(str(environment.get("SEARCHSVC_API_KEYS", "")))
        or "--requirepass" in command
        or resolved(environment.get("POSTGRES_PASSWORD", "")) not in ("", "searchsvc")
    )


def test_no_service_is_published_without_a_password_or_key(compose: dict[str, Any]) -> None:
    """A published port is reachable from outside the host; the compose defaults hold no
    secret (the database's password is the well-known ``searchsvc``), so nothing is."""
    for name, service in compose["services"].items():
        if service.get("ports"):
            assert _has_credential(service), f"{name} is published without a password or key"
