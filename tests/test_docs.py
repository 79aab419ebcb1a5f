"""The README documents every setting the code reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from searchsvc.core.config import ENV_PREFIX, Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_in_the_readme_table() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [
        ENV_PREFIX + f.name.upper()
        for f in dataclasses.fields(Settings)
        if f.name != "config_file" and f"| `{ENV_PREFIX}{f.name.upper()}` |" not in text
    ]
    assert not missing, f"README's settings table lacks {missing}"
