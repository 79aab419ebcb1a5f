from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the catalog factory helpers

from catalog_factory import GeneratedCatalog, make_catalog  # noqa: E402

from searchsvc.core.config import Settings, load_settings  # noqa: E402


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def settings(home: Path) -> Settings:
    return load_settings(env={"SEARCHSVC_HOME": str(home)})


@pytest.fixture
def catalog(tmp_path: Path) -> GeneratedCatalog:
    return make_catalog(tmp_path / "catalog", products=12, views=3)


@pytest.fixture
def env_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the CLI at a fresh home through the environment, as a user would."""
    for key in list(__import__("os").environ):
        if key.startswith("SEARCHSVC_") and not key.startswith("SEARCHSVC_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SEARCHSVC_HOME", str(home))
    yield home
