"""Credentials never reach output: a broker, Qdrant or database URL's password and the
Qdrant API key are replaced by *** in every error the CLI prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from catalog_factory import make_catalog
from workers_harness import REPO, cli_env, free_port

from searchsvc.core.config import load_settings, redact_secrets, url_password


def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "searchsvc.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def test_unreachable_broker_error_names_the_url_without_its_password(tmp_path: Path) -> None:
    catalog = make_catalog(tmp_path / "catalog", products=2, views=1)
    port = free_port()  # nothing listens there
    env = cli_env(
        tmp_path / "home",
        {"SEARCHSVC_BROKER_URL": f"redis://:Br0ker-S3cret@127.0.0.1:{port}/0"},
    )
    code, output = run_cli(env, "ingest", str(catalog.root))
    assert code == 1, output
    assert f"redis://:***@127.0.0.1:{port}/0" in output
    assert "Br0ker-S3cret" not in output and "Traceback" not in output


def test_unreachable_qdrant_error_carries_neither_password_nor_api_key(tmp_path: Path) -> None:
    catalog = make_catalog(tmp_path / "catalog", products=2, views=1)
    port = free_port()
    env = cli_env(
        tmp_path / "home",
        {
            "SEARCHSVC_QDRANT_URL": f"http://admin:Qdr4nt-S3cret@127.0.0.1:{port}",
            "SEARCHSVC_QDRANT_API_KEY": "k3y-0f-qdrant",
        },
    )
    code, output = run_cli(env, "ingest", str(catalog.root))
    assert code == 1, output
    assert "Qdrant" in output and f"127.0.0.1:{port}" in output
    assert "Qdr4nt-S3cret" not in output and "k3y-0f-qdrant" not in output


def test_redact_secrets_hides_passwords_and_keys_plain_and_quoted() -> None:
    settings = load_settings(
        env={
            "SEARCHSVC_DATABASE_URL": "postgresql://u:db%2Fpw@h/d",
            "SEARCHSVC_BROKER_URL": "redis://:brk@h:6379/0",
            "SEARCHSVC_QDRANT_API_KEY": "qkey",
        }
    )
    assert sorted(settings.secrets()) == ["brk", "db/pw", "qkey"]
    assert url_password("redis://h:6379/0") == ""
    message = "failed: redis://:brk@h:6379/0 db%2Fpw db/pw header api-key=qkey"
    assert redact_secrets(message, settings.secrets()) == (
        "failed: redis://:***@h:6379/0 *** *** header api-key=***"
    )
