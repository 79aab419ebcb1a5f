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


def test_image_url_fetching_is_off_by_default() -> None:
    settings = load_settings(env={})
    assert settings.api_image_url_hosts == ""
    assert settings.api_image_url_allowlist == frozenset()
    assert settings.api_image_url_timeout_s == 5.0


def test_image_url_hosts_parse_into_host_port_pairs() -> None:
    settings = load_settings(
        env={"SEARCHSVC_API_IMAGE_URL_HOSTS": " CDN.Example.com, 127.0.0.1:8080,[::1]:9000 "}
    )
    assert settings.api_image_url_allowlist == {
        ("cdn.example.com", None),
        ("127.0.0.1", 8080),
        ("::1", 9000),
    }


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("https://cdn.example.com", "scheme"),
        ("cdn.example.com/images", "path"),
        ("cdn.example.com,,other.example.com", "empty"),
        ("cdn.example.com,", "empty"),
        ("cdn example com", "host name"),
        ("cdn.example.com:0", "port"),
        ("cdn.example.com:70000", "port"),
        ("cdn.example.com:http", "host name"),
        ("a..b", "host name"),
    ],
)
def test_a_bad_image_url_host_names_the_setting(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"SEARCHSVC_API_IMAGE_URL_HOSTS": value})
    assert "SEARCHSVC_API_IMAGE_URL_HOSTS" in str(caught.value)
    assert says in str(caught.value)


def test_an_image_url_host_with_user_information_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"SEARCHSVC_API_IMAGE_URL_HOSTS": "user:s3cret@cdn.example.com"})
    assert "SEARCHSVC_API_IMAGE_URL_HOSTS" in str(caught.value) and "'@'" in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_image_url_timeout_must_be_positive_and_finite(value: str) -> None:
    with pytest.raises(ConfigError, match="SEARCHSVC_API_IMAGE_URL_TIMEOUT_S"):
        load_settings(env={"SEARCHSVC_API_IMAGE_URL_TIMEOUT_S": value})
