"""The API's settings: keys with scopes, limits; a bad value names the setting, never the key."""

from __future__ import annotations

import pytest

from searchsvc.core.config import load_settings
from searchsvc.core.errors import ConfigError
from searchsvc.serving.http.metrics import reason_label

GOOD = "a" * 16


def test_keys_parse_into_scopes() -> None:
    settings = load_settings(
        env={"SEARCHSVC_API_KEYS": f"{GOOD}:read, {'b' * 20}:write,", "SEARCHSVC_HOME": "/tmp/x"}
    )
    assert settings.api_key_scopes == {GOOD: "read", "b" * 20: "write"}
    assert load_settings(env={}).api_key_scopes == {}


@pytest.mark.parametrize(
    "value",
    [f"{GOOD}:admin", f"{GOOD}", "short:read", f"{GOOD}:read,{GOOD}x"],
)
def test_a_bad_key_entry_is_refused_without_echoing_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"SEARCHSVC_API_KEYS": value})
    assert "SEARCHSVC_API_KEYS" in str(caught.value)
    assert GOOD not in str(caught.value) and "short" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SEARCHSVC_API_MAX_REQUEST_BYTES", "0"),
        ("SEARCHSVC_API_MAX_BATCH_IMAGES", "-1"),
        ("SEARCHSVC_API_REQUEST_TIMEOUT_S", "nan"),
        ("SEARCHSVC_API_REQUEST_TIMEOUT_S", "0"),
    ],
)
def test_limits_must_be_positive(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(env={name: value})


def test_fallback_reasons_become_bounded_metric_labels() -> None:
    assert reason_label("reranker failed: ModelError: file x is gone") == "reranker failed"
    assert reason_label("reranker timed out after 2 s") == "reranker timed out after 2 s"
    assert reason_label("") == "unknown"
