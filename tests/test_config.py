"""Settings: defaults, TOML and environment precedence, validation messages, derived paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from searchsvc.core.config import Settings, load_settings
from searchsvc.core.errors import ConfigError


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def load(home: Path, **env: str) -> Settings:
    return load_settings(env={"SEARCHSVC_HOME": str(home), **env})


def config_error(home: Path, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(home, **env)
    return str(info.value)


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults -------------------------------------------------------------------------------


def test_defaults_without_file_or_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # the default home is relative: keep it in an empty folder
    settings = load_settings(env={})
    assert settings.home == Path(".searchsvc")
    assert settings.batch_size == 64
    assert settings.top_k == 20
    assert settings.rerank is True
    assert settings.rerank_top_n == 5
    assert settings.rerank_timeout_s == 2.0
    assert settings.device == "auto"
    assert settings.precision == "auto"
    assert settings.index_writer == "auto"
    assert settings.embedder_profile == "small64"
    assert settings.collection_alias == "images"
    assert settings.max_image_pixels == 40_000_000
    assert settings.max_image_bytes == 50 * 1024 * 1024
    assert settings.database_url == settings.qdrant_url == settings.broker_url == ""
    assert settings.config_file is None


def test_environment_of_the_process_is_ignored_when_env_is_given(
    home: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("SEARCHSVC_BATCH_SIZE", "3")
    assert load(home).batch_size == 64
    monkeypatch.setenv("SEARCHSVC_HOME", str(home))
    assert load_settings().batch_size == 3  # env=None reads os.environ


# --- precedence ---------------------------------------------------------------------------


def test_toml_from_home_overrides_defaults(home: Path):
    toml = write_toml(home / "searchsvc.toml", "batch_size = 8\ntop_k = 30\nrerank = false\n")
    settings = load(home)
    assert (settings.batch_size, settings.top_k, settings.rerank) == (8, 30, False)
    assert settings.rerank_top_n == 5  # untouched keys keep their defaults
    assert settings.config_file == toml


def test_toml_searchsvc_section_is_read(home: Path):
    write_toml(home / "searchsvc.toml", '[searchsvc]\nbatch_size = 9\ndevice = "cpu"\n')
    settings = load(home)
    assert settings.batch_size == 9
    assert settings.device == "cpu"


def test_explicit_config_file_wins_over_the_home_file(home: Path, tmp_path: Path):
    write_toml(home / "searchsvc.toml", "batch_size = 8\n")
    explicit = write_toml(tmp_path / "elsewhere" / "cfg.toml", "batch_size = 16\n")
    settings = load(home, SEARCHSVC_CONFIG=str(explicit))
    assert settings.batch_size == 16
    assert settings.config_file == explicit


def test_environment_overrides_toml_overrides_defaults(home: Path, tmp_path: Path):
    toml = write_toml(
        tmp_path / "cfg.toml",
        "[searchsvc]\nbatch_size = 8\ntop_k = 30\nrerank_timeout_s = 5\n",
    )
    settings = load(home, SEARCHSVC_CONFIG=str(toml), SEARCHSVC_BATCH_SIZE=" 12 ")
    assert settings.batch_size == 12  # env over TOML
    assert settings.top_k == 30  # TOML over default
    assert settings.rerank_timeout_s == 5.0
    assert settings.rerank_top_n == 5  # default


def test_overrides_win_over_environment(home: Path):
    settings = load_settings(
        env={"SEARCHSVC_HOME": str(home), "SEARCHSVC_BATCH_SIZE": "12"},
        overrides={"batch_size": 2},
    )
    assert settings.batch_size == 2


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("TRUE", True), ("yes", True), ("on", True)]
    + [("0", False), ("False", False), ("no", False), ("off", False)],
)
def test_bool_spellings(home: Path, raw: str, expected: bool):
    assert load(home, SEARCHSVC_RERANK=raw).rerank is expected


def test_typed_values_from_environment(home: Path, tmp_path: Path):
    settings = load(
        home,
        SEARCHSVC_DEVICE="cpu",
        SEARCHSVC_PRECISION="bf16",
        SEARCHSVC_RERANK_TIMEOUT_S="0.5",
        SEARCHSVC_MEDIA_ROOT=str(tmp_path / "media"),
        SEARCHSVC_TEST_WHATEVER="ignored",  # test-suite switches are not settings
    )
    assert settings.device == "cpu"
    assert settings.precision == "bf16"
    assert settings.rerank_timeout_s == 0.5
    assert settings.media_root == tmp_path / "media"
    assert settings.media_dir == tmp_path / "media"


# --- validation: each error names the setting ----------------------------------------------


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"SEARCHSVC_BATCH_SIZE": "0"}, ["SEARCHSVC_BATCH_SIZE", "positive"]),
        ({"SEARCHSVC_TOP_K": "-1"}, ["SEARCHSVC_TOP_K", "positive"]),
        ({"SEARCHSVC_MAX_IMAGE_PIXELS": "0"}, ["SEARCHSVC_MAX_IMAGE_PIXELS"]),
        ({"SEARCHSVC_MAX_IMAGE_BYTES": "0"}, ["SEARCHSVC_MAX_IMAGE_BYTES"]),
        ({"SEARCHSVC_BATCH_SIZE": "many"}, ["SEARCHSVC_BATCH_SIZE", "'many'"]),
        ({"SEARCHSVC_SEED": "1.5"}, ["SEARCHSVC_SEED", "'1.5'"]),
        ({"SEARCHSVC_RERANK_TOP_N": "1"}, ["SEARCHSVC_RERANK_TOP_N", "greater than 1"]),
        (
            {"SEARCHSVC_TOP_K": "3"},  # default rerank_top_n (5) is now over top_k
            ["SEARCHSVC_RERANK_TOP_N", "SEARCHSVC_TOP_K (3)", "got 5"],
        ),
        (
            {"SEARCHSVC_TOP_K": "10", "SEARCHSVC_RERANK_TOP_N": "11"},
            ["SEARCHSVC_RERANK_TOP_N", "SEARCHSVC_TOP_K (10)"],
        ),
        ({"SEARCHSVC_RERANK_TIMEOUT_S": "0"}, ["SEARCHSVC_RERANK_TIMEOUT_S"]),
        ({"SEARCHSVC_RERANK_TIMEOUT_S": "nan"}, ["SEARCHSVC_RERANK_TIMEOUT_S"]),
        ({"SEARCHSVC_RERANK_TIMEOUT_S": "inf"}, ["SEARCHSVC_RERANK_TIMEOUT_S"]),
        ({"SEARCHSVC_EMBED_TASK_RESEND_S": "0"}, ["SEARCHSVC_EMBED_TASK_RESEND_S"]),
        ({"SEARCHSVC_EMBED_TASK_TIMEOUT_S": "-1"}, ["SEARCHSVC_EMBED_TASK_TIMEOUT_S"]),
        ({"SEARCHSVC_RERANK": "maybe"}, ["SEARCHSVC_RERANK", "'maybe'", "true or false"]),
        ({"SEARCHSVC_DEVICE": "gpu"}, ["SEARCHSVC_DEVICE", "'gpu'", "auto, cpu, cuda"]),
        ({"SEARCHSVC_PRECISION": "fp8"}, ["SEARCHSVC_PRECISION", "'fp8'"]),
        ({"SEARCHSVC_INDEX_WRITER": "both"}, ["SEARCHSVC_INDEX_WRITER", "'both'"]),
        ({"SEARCHSVC_FOO": "1"}, ["SEARCHSVC_FOO", "unknown setting"]),
        ({"SEARCHSVC_BROKER_URL": "amqp://host//"}, ["SEARCHSVC_BROKER_URL", "redis://"]),
        ({"SEARCHSVC_BROKER_URL": "localhost:6379"}, ["SEARCHSVC_BROKER_URL", "scheme"]),
        ({"SEARCHSVC_DATABASE_URL": "just-a-name"}, ["SEARCHSVC_DATABASE_URL", "scheme"]),
        ({"SEARCHSVC_QDRANT_URL": "host:6333"}, ["SEARCHSVC_QDRANT_URL", "scheme"]),
        ({"SEARCHSVC_COLLECTION_ALIAS": "a b"}, ["SEARCHSVC_COLLECTION_ALIAS"]),
        (
            {"SEARCHSVC_EMBEDDER_PROFILE": "huge"},
            ["SEARCHSVC_EMBEDDER_PROFILE", "'huge'", "small", "vit_s16"],
        ),
        ({"SEARCHSVC_EMBEDDER_WEIGHTS": "/nonexistent/w.safetensors"}, ["EMBEDDER_WEIGHTS"]),
    ],
)
def test_invalid_environment_values_name_the_setting(
    home: Path, env: dict[str, str], names: list[str]
):
    message = config_error(home, **env)
    for name in names:
        assert name in message


def test_rerank_top_n_equal_to_top_k_is_allowed(home: Path):
    settings = load(home, SEARCHSVC_TOP_K="4", SEARCHSVC_RERANK_TOP_N="4")
    assert settings.rerank_top_n == settings.top_k == 4


def test_error_for_a_bad_url_hides_its_password(home: Path):
    message = config_error(home, SEARCHSVC_BROKER_URL="amqp://user:s3cret@host//")
    assert "SEARCHSVC_BROKER_URL" in message
    assert "s3cret" not in message


def test_unknown_key_in_toml_names_file_and_key(home: Path):
    toml = write_toml(home / "searchsvc.toml", "[searchsvc]\nbatchsize = 8\n")
    message = config_error(home)
    assert str(toml) in message
    assert "'batchsize'" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('batch_size = "eight"', "'batch_size'"),
        ("batch_size = 8.5", "'batch_size'"),  # must not be truncated to 8
        ("batch_size = true", "'batch_size'"),
        ('device = "gpu"', "'device'"),
        ("rerank = 2", "'rerank'"),
        ("qdrant_url = 5", "'qdrant_url'"),
    ],
)
def test_wrongly_typed_toml_values_name_file_and_key(home: Path, text: str, key: str):
    toml = write_toml(home / "searchsvc.toml", text + "\n")
    message = config_error(home)
    assert str(toml) in message
    assert key in message


def test_toml_values_are_validated_like_environment_values(home: Path):
    write_toml(home / "searchsvc.toml", "batch_size = 0\n")
    assert "SEARCHSVC_BATCH_SIZE" in config_error(home)


def test_malformed_toml_names_the_file(home: Path):
    toml = write_toml(home / "searchsvc.toml", "batch_size = [\n")
    message = config_error(home)
    assert str(toml) in message
    assert "not valid TOML" in message


def test_non_utf8_toml_names_the_file(home: Path):
    toml = home / "searchsvc.toml"
    toml.write_bytes(b"collection_alias = '\xff\xfe'\n")
    assert str(toml) in config_error(home)


def test_searchsvc_key_that_is_not_a_table_is_a_config_error(home: Path):
    toml = write_toml(home / "searchsvc.toml", "searchsvc = 5\n")
    assert str(toml) in config_error(home)


def test_missing_explicit_config_file(home: Path, tmp_path: Path):
    missing = tmp_path / "nope.toml"
    message = config_error(home, SEARCHSVC_CONFIG=str(missing))
    assert "SEARCHSVC_CONFIG" in message
    assert str(missing) in message


def test_missing_home_file_is_fine(home: Path):
    assert load(home).config_file is None


# --- derived values ---------------------------------------------------------------------


def test_sqlalchemy_url_defaults_to_sqlite_under_home(home: Path):
    settings = load(home)
    assert settings.sqlalchemy_url == f"sqlite:///{(home / 'searchsvc.db').resolve()}"
    assert settings.qdrant_path == home / "qdrant"
    assert settings.models_dir == home / "models"
    assert settings.media_dir == home / "media"
    assert settings.query_images_dir == home / "queries"


def test_sqlalchemy_url_is_the_database_url_when_set(home: Path):
    url = "postgresql+psycopg://u:p@db:5432/search"
    assert load(home, SEARCHSVC_DATABASE_URL=url).sqlalchemy_url == url


def test_relative_home_resolves_to_an_absolute_sqlite_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={"SEARCHSVC_HOME": "rel"})
    assert settings.sqlalchemy_url == f"sqlite:///{(tmp_path / 'rel' / 'searchsvc.db').resolve()}"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"SEARCHSVC_QDRANT_URL": "http://qdrant:6333"}, True),
        ({"SEARCHSVC_INDEX_WRITER": "worker"}, True),
        ({"SEARCHSVC_INDEX_WRITER": "coordinator", "SEARCHSVC_QDRANT_URL": "http://q:6333"}, False),
        ({"SEARCHSVC_INDEX_WRITER": "worker", "SEARCHSVC_QDRANT_URL": "http://q:6333"}, True),
    ],
)
def test_workers_write_index(home: Path, env: dict[str, str], expected: bool):
    assert load(home, **env).workers_write_index is expected


def test_describe_redacts_passwords(home: Path, tmp_path: Path):
    toml = write_toml(tmp_path / "cfg.toml", "top_k = 25\n")
    settings = load(
        home,
        SEARCHSVC_CONFIG=str(toml),
        SEARCHSVC_DATABASE_URL="postgresql+psycopg://app:dbpass@db:5432/search",
        SEARCHSVC_BROKER_URL="redis://:brokerpass@redis:6379/0",
        SEARCHSVC_QDRANT_URL="https://reader:qdrantpass@qdrant:6333",
    )
    described = settings.describe()
    text = repr(described)
    for secret in ("dbpass", "brokerpass", "qdrantpass"):
        assert secret not in text
    assert described["database"] == "postgresql+psycopg://app:***@db:5432/search"
    assert described["broker"] == "redis://:***@redis:6379/0"
    assert described["qdrant"] == "https://reader:***@qdrant:6333"
    assert described["config_file"] == str(toml)


def test_describe_embedded_defaults(home: Path):
    described = load(home).describe()
    assert described["home"] == str(home.resolve())
    assert described["database"].startswith("sqlite:///")
    assert described["qdrant"] == f"embedded:{(home / 'qdrant').resolve()}"
    assert described["broker"] == "in-process"
    assert described["media"] == str((home / "media").resolve())
    assert described["config_file"] == ""
