"""The one configuration object of searchsvc.

Values come from, in increasing priority: built-in defaults, an optional TOML file
(``SEARCHSVC_CONFIG`` or ``$SEARCHSVC_HOME/searchsvc.toml``), then ``SEARCHSVC_*``
environment variables. Every value is validated once, at start, and an error names the
setting (``SEARCHSVC_BATCH_SIZE``) and the reason.

Embedded defaults need no server: SQLite and the Qdrant store live under ``home`` and tasks
run in-process. Setting ``database_url``, ``qdrant_url`` and ``broker_url`` moves the same
code to PostgreSQL, a Qdrant server and Celery worker pools.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from searchsvc.core.errors import ConfigError
from searchsvc.core.profiles import embedder_profile_names

ENV_PREFIX = "SEARCHSVC_"
Device = Literal["auto", "cpu", "cuda"]
IndexWriter = Literal["auto", "coordinator", "worker"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
WithoutWorker = Literal["wait", "stop"]
PixelStoreKind = Literal["sqlite", "postgresql"]
_CHOICES: dict[str, tuple[str, ...]] = {
    "WithoutWorker": get_args(WithoutWorker),
    "PixelStoreKind": get_args(PixelStoreKind),
    "Device": get_args(Device),
    "IndexWriter": get_args(IndexWriter),
    "Precision": get_args(Precision),
}


@dataclass(frozen=True)
class Settings:
    """Validated settings. Construct with :func:`load_settings`, not directly."""

    home: Path = Path(".searchsvc")
    """Holds the embedded SQLite DB, the embedded Qdrant store, model files and media."""
    database_url: str = ""
    """SQLAlchemy URL; empty means SQLite at ``home/searchsvc.db``."""
    qdrant_url: str = ""
    """Qdrant server URL (http://host:6333); empty means the embedded store at ``home/qdrant``."""
    qdrant_api_key: str = ""
    broker_url: str = ""
    """Celery broker (redis://...); empty means tasks run in-process."""
    result_backend_url: str = ""
    """Celery result backend; empty means the broker URL."""
    media_root: Path | None = None
    """Content-addressed preprocessed pixels for the reranker; default ``home/media``."""
    pixel_store: PixelStoreKind = "sqlite"
    """Where the reranker's pixels live (:mod:`searchsvc.storage.pixels`): ``sqlite``, one
    file in the media folder, shared by one host's processes; ``postgresql``, the
    ``pixels`` table of ``database_url``, shared by every host of a cluster."""
    collection_alias: str = "images"
    embedder_profile: str = "small64"
    """The laptop default: the CPU-sized ViT at 64x64 (``core.profiles``). Against ``small``
    (32x32) it measured higher CMC@1 on colour photographs at the same ingest speed, and
    level on grey Fashion-MNIST articles (``benchmarks/results/quality.md``)."""
    embedder_weights: Path | None = None
    """A safetensors file for the first embedder version; none means the profile's own start."""
    device: Device = "auto"
    precision: Precision = "auto"
    """Autocast dtype: ``auto`` = bf16/fp16 on CUDA; on the CPU the embedder exact fp32,
    training and STIR's scoring bf16 where the CPU has AMX or AVX512-BF16
    (``models.runtime.training_autocast_dtype``, ``rerank_autocast_dtype``)."""
    torch_threads: int = 0
    """CPU threads of one forward pass; 0 keeps torch's default (one per core). Set 1 where
    the CPU is shared: measured here, a one-image query embedded in 4 ms with 1 thread and in
    450 ms with 2 while another process kept both cores busy."""
    batch_size: int = 64
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 50 * 1024 * 1024
    top_k: int = 20
    rerank: bool = True
    rerank_top_n: int = 5
    rerank_timeout_s: float = 2.0
    rerank_max_batch_pairs: int = 256
    """Pairs one STIR forward may hold when requests are batched across queries."""
    rerank_batch_wait_ms: float = 0.0
    """How long a rerank worker holds a request for others to join its batch. 0 (default):
    no added latency; requests that arrive while a forward runs form the next batch."""
    index_writer: IndexWriter = "auto"
    """Who writes vectors: the ingest coordinator (required for an embedded store, which one
    process may open) or the workers (a Qdrant server). ``auto`` picks by ``qdrant_url``."""
    ingest_tasks_in_flight: int = 4
    """Embed tasks the ingest coordinator keeps queued at once (about 2 per embed worker
    keeps a pool busy); memory grows with this times the batch size, not the catalog."""
    index_lock_wait_s: float = 600.0
    """How long an ingest waits for another process to release the embedded index (two
    ingests started together run one after the other); queries never wait."""
    embed_task_timeout_s: float = 900.0
    """How long the ingest coordinator waits for one embed task before giving up (its rows
    stay pending for the next run)."""
    task_time_limit_s: float = 300.0
    """The longest one embed task works, in every pool (solo and threads pools ignore
    Celery's time limits, so the task checks this deadline itself): past it, the task fails
    and its images stay pending. Also the prefork pool's soft limit (hard: 60 s later)."""
    embed_task_resend_s: float = 300.0
    """An embed task without a result after this long is sent again (embedding is
    idempotent; the first copy to finish answers): a Redis broker can lose the task of a
    worker that died (:func:`searchsvc.jobs.dispatch.result_with_resends`)."""
    ingest_without_worker: WithoutWorker = "wait"
    """With a broker, when no worker consumes the embed queue as an ingest starts: say so at
    once and ``wait`` for one (up to ``embed_task_timeout_s`` per task), or ``stop``."""
    embed_max_deliveries: int = 3
    """An image whose embedding was under way when its worker died (killed for memory, a
    segfault) this many times is recorded as failed instead of being sent again forever."""
    task_visibility_timeout_s: float = 3600.0
    """Redis broker: a task taken by a worker that died unacknowledged is handed to another
    worker after this long."""
    follow_symlinks_outside_catalog: bool = False
    """Read a catalog's symbolic links whose target lies outside the catalog folder. Off:
    such links are named in the ingest summary and never read."""
    sync_max_delete_fraction: float = 0.25
    """``ingest --sync`` refuses to remove more than this share of a catalog's live images
    (an empty or half-mounted share looks like a catalog whose images were all deleted);
    ``--max-delete`` or ``--force`` overrides it for one run."""
    seed: int = 0
    split_seed: int = 0
    """Seed of the train/validation split by product (retrain and ``searchsvc eval``)."""
    val_fraction: float = 0.2
    """Share of the products held out for validation: model selection and the promotion
    gate; never trained on."""
    api_keys: str = ""
    """Keys of the HTTP API (``searchsvc serve``): comma-separated ``KEY:SCOPE`` pairs, scope
    ``read`` (search, similar, feedback, status) or ``write`` (also product updates and
    ingests). Empty: no key is asked, for a server on the loopback interface."""
    api_cors_origins: str = ""
    """Browser origins allowed to call the API, comma-separated; empty: CORS off."""
    api_max_request_bytes: int = 20 * 1024 * 1024
    """Largest request body the API reads (413 above it)."""
    api_request_timeout_s: float = 30.0
    """How long the API works on one search or product update before answering 408."""
    api_max_batch_images: int = 16
    """Photos one ``POST /v1/search/batch`` may carry."""
    api_image_url_hosts: str = ""
    """Hosts ``POST /v1/search`` may fetch a JSON ``image_url`` from, comma-separated
    ``host`` or ``host:port`` (no scheme, path or user): http and https only, every redirect
    hop checked again; an entry without a port allows the scheme's default port (80, 443)
    only. Empty (default): fetching by URL is off. Fetched files obey ``max_image_bytes``
    and ``max_image_pixels`` like uploads."""
    api_image_url_timeout_s: float = 5.0
    """The whole of one ``image_url`` fetch (connecting, redirects, the body) before 408."""
    val_sample_images: int = 20_000
    """At most this many validation images are evaluated (whole products, chosen by a hash
    seeded by ``split_seed``, the same for every model compared): evaluation memory and
    time stay bounded as the catalog grows."""
    query_retention_days: float = 0.0
    """``searchsvc cleanup`` removes logged query photos older than this (0: kept for ever;
    they are the learning loop's most valuable data)."""
    config_file: Path | None = field(default=None, compare=False)

    # Derived locations: one place decides where each thing lives.
    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'searchsvc.db').resolve()}"

    @property
    def qdrant_path(self) -> Path:
        return self.home / "qdrant"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def media_dir(self) -> Path:
        return self.media_root if self.media_root is not None else self.home / "media"

    @property
    def query_images_dir(self) -> Path:
        return self.home / "queries"

    @property
    def blobs_dir(self) -> Path:
        """The embedded blob store's folder (:mod:`searchsvc.storage.blobs`)."""
        return self.home / "blobs"

    @property
    def api_key_scopes(self) -> dict[str, str]:
        """API key -> its scope (``read`` or ``write``), parsed from ``api_keys``."""
        scopes: dict[str, str] = {}
        for entry in filter(None, (part.strip() for part in self.api_keys.split(","))):
            key, _, scope = entry.rpartition(":")
            scopes[key] = scope
        return scopes

    @property
    def api_image_url_allowlist(self) -> frozenset[tuple[str, int | None]]:
        """``(host, port)`` pairs parsed from ``api_image_url_hosts`` (host lower-cased,
        port None: the scheme's default port only); empty: fetching by URL is off."""
        return frozenset(
            parse_host_entry(entry)
            for entry in filter(None, (p.strip() for p in self.api_image_url_hosts.split(",")))
        )

    @property
    def workers_write_index(self) -> bool:
        if self.index_writer == "auto":
            return bool(self.qdrant_url)
        return self.index_writer == "worker"

    def secrets(self) -> list[str]:
        """The credentials these settings hold (URL passwords, the Qdrant API key): what no
        message may print."""
        urls = (self.sqlalchemy_url, self.qdrant_url, self.broker_url, self.result_backend_url)
        return [s for s in (*map(url_password, urls), self.qdrant_api_key) if s]

    def describe(self) -> dict[str, str]:
        """Where data lives, for ``searchsvc status`` (secrets left out)."""
        return {
            "home": str(self.home.resolve()),
            "database": _redact(self.sqlalchemy_url),
            "qdrant": _redact(self.qdrant_url) or f"embedded:{self.qdrant_path.resolve()}",
            "broker": _redact(self.broker_url) or "in-process",
            "media": str(self.media_dir.resolve()),
            "pixel_store": self.pixel_store,
            "config_file": str(self.config_file) if self.config_file else "",
        }


_HOST_ENTRY = re.compile(
    r"(?P<host>[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{1,5}))?"
)


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """``host`` or ``host:port`` (``[::1]:8080`` for IPv6) -> ``(host, port or None)``, the
    host lower-cased without brackets; ValueError naming the problem otherwise."""
    text = entry.strip().lower()
    if "@" in text:
        raise ValueError("an entry must not carry user information ('@')")
    if "://" in text or "/" in text:
        raise ValueError("an entry is a host or host:port, without a scheme or a path")
    match = _HOST_ENTRY.fullmatch(text)
    if match is None or ".." in text:
        raise ValueError("an entry is a host name, an IPv4 address or [IPv6], and a :port")
    port = int(match["port"]) if match["port"] is not None else None
    if port is not None and not 0 < port < 65536:
        raise ValueError("a port is between 1 and 65535")
    return match["host"].strip("[]"), port


def redact_url(url: str) -> str:
    """Hide a password in a URL (``user:secret@host`` -> ``user:***@host``)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"


_redact = redact_url  # the name the storage layer imports


def url_password(url: str) -> str:
    """The password a URL carries (``redis://:secret@host`` -> ``secret``), or ``""``."""
    if "@" not in url or "://" not in url:
        return ""
    creds = url.split("://", 1)[1].rsplit("@", 1)[0]
    return urllib.parse.unquote(creds.split(":", 1)[1]) if ":" in creds else ""


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every URL password and each of ``secrets`` replaced by ``***``: for
    messages that quote a URL or a library's error, which may carry either."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
        quoted = urllib.parse.quote(secret, safe="")
        if quoted != secret:
            text = text.replace(quoted, "***")
    return text


_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "config_file"}


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _coerce(name: str, raw: Any, source: str) -> Any:
    """Turn a raw TOML or environment value into the field's type, or raise ConfigError."""
    where = f"{_env_name(name)}" if source == "env" else f"{source}: '{name}'"
    annotation = _FIELDS[name].type
    text = raw.strip() if isinstance(raw, str) else raw
    try:
        if annotation == "Path":
            return Path(str(text)).expanduser()
        if annotation == "Path | None":
            return Path(str(text)).expanduser() if str(text) else None
        if annotation == "bool":
            if isinstance(text, bool):
                return text
            lowered = str(text).lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError("expected true or false")
        if annotation == "int":
            if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
                raise ValueError("expected an integer")
            return int(text)
        if annotation == "float":
            if isinstance(text, bool):
                raise ValueError("expected a number")
            return float(text)
        if annotation in _CHOICES:
            choices = _CHOICES[annotation]
            if text not in choices:
                raise ValueError(f"expected one of {', '.join(choices)}")
            return text
        if not isinstance(text, str):
            raise ValueError("expected a string")
        return text
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid value {raw!r} ({exc})") from None


def _validate(settings: Settings) -> None:
    def fail(name: str, reason: str) -> None:
        value = getattr(settings, name)
        if isinstance(value, str):
            value = _redact(value)  # an error message must not carry a URL's password
        raise ConfigError(f"{_env_name(name)}: {reason}, got {value!r}")

    for name in (
        "batch_size",
        "max_image_pixels",
        "max_image_bytes",
        "top_k",
        "rerank_max_batch_pairs",
        "ingest_tasks_in_flight",
        "embed_max_deliveries",
        "api_max_request_bytes",
        "api_max_batch_images",
        "val_sample_images",
    ):
        if getattr(settings, name) <= 0:
            fail(name, "must be a positive integer")
    if settings.rerank_top_n < 2:
        fail("rerank_top_n", "must be greater than 1 (STIR reorders at least two candidates)")
    if settings.rerank_top_n > settings.top_k:
        fail("rerank_top_n", f"must be at most SEARCHSVC_TOP_K ({settings.top_k})")
    for entry in filter(None, (part.strip() for part in settings.api_keys.split(","))):
        key, sep, scope = entry.rpartition(":")
        if not sep or scope not in {"read", "write"} or len(key) < 16:
            # The keys themselves never go into the message.
            raise ConfigError(
                f"{_env_name('api_keys')}: each entry must be KEY:read or KEY:write with a key "
                "of at least 16 characters"
            )
    for name in (
        "rerank_timeout_s",
        "embed_task_timeout_s",
        "embed_task_resend_s",
        "task_time_limit_s",
        "api_request_timeout_s",
        "api_image_url_timeout_s",
    ):
        seconds = getattr(settings, name)
        if not math.isfinite(seconds) or seconds <= 0:
            fail(name, "must be a positive, finite number of seconds")
    entries = [part.strip() for part in settings.api_image_url_hosts.split(",")]
    if settings.api_image_url_hosts.strip() and not all(entries):
        fail("api_image_url_hosts", "an entry is empty (stray comma)")
    for entry in filter(None, entries):
        try:
            parse_host_entry(entry)
        except ValueError as exc:
            if "@" in entry:  # may carry a password: the value stays out of the message
                raise ConfigError(f"{_env_name('api_image_url_hosts')}: {exc}") from None
            raise ConfigError(f"{_env_name('api_image_url_hosts')}: {exc}, got {entry!r}") from None
    if not 0.0 <= settings.sync_max_delete_fraction <= 1.0:
        fail("sync_max_delete_fraction", "must be between 0 and 1")
    if not math.isfinite(settings.query_retention_days) or settings.query_retention_days < 0:
        fail("query_retention_days", "must be a finite number of days, 0 or more")
    if not 0.0 < settings.val_fraction < 1.0:
        fail("val_fraction", "must be between 0 and 1 (exclusive)")
    for name in ("database_url", "qdrant_url", "broker_url", "result_backend_url"):
        value = getattr(settings, name)
        if value and "://" not in value:
            fail(name, "must be a URL with a scheme (for example redis://host:6379/0)")
    if settings.pixel_store == "postgresql" and not settings.database_url.startswith("postgresql"):
        fail("pixel_store", "postgresql needs SEARCHSVC_DATABASE_URL to name a PostgreSQL database")
    if settings.broker_url and not settings.broker_url.startswith(("redis://", "rediss://")):
        fail("broker_url", "must be a redis:// or rediss:// URL")
    if not settings.collection_alias.replace("_", "").replace("-", "").isalnum():
        fail("collection_alias", "must be letters, digits, '-' and '_'")
    if settings.embedder_weights is not None and not settings.embedder_weights.is_file():
        fail("embedder_weights", "file does not exist")
    if settings.embedder_profile not in embedder_profile_names():
        fail("embedder_profile", f"unknown profile; known: {', '.join(embedder_profile_names())}")


def load_settings(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Read defaults, then the TOML file, then ``SEARCHSVC_*`` variables; validate.

    ``overrides`` (already typed, from CLI options) win over everything.
    """
    environ = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}

    home = Path(environ.get(_env_name("home"), ".searchsvc")).expanduser()
    explicit_file = environ.get(ENV_PREFIX + "CONFIG", "")
    config_file = Path(explicit_file).expanduser() if explicit_file else home / "searchsvc.toml"
    if explicit_file and not config_file.is_file():
        raise ConfigError(f"SEARCHSVC_CONFIG: file {str(config_file)!r} does not exist")
    if config_file.is_file():
        try:
            table = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{config_file}: not valid TOML ({exc})") from None
        section = table.get("searchsvc", table)
        if not isinstance(section, dict):
            raise ConfigError(f"{config_file}: 'searchsvc' must be a table ([searchsvc])")
        for key, raw in section.items():
            if key not in _FIELDS:
                raise ConfigError(f"{config_file}: unknown setting {key!r}")
            values[key] = _coerce(key, raw, str(config_file))
    else:
        config_file = None  # type: ignore[assignment]

    known_env = {_env_name(name): name for name in _FIELDS}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        if key.startswith(ENV_PREFIX + "TEST_"):
            continue  # test-suite switches, not settings
        if key not in known_env:
            raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(known_env))})")
        values[known_env[key]] = _coerce(known_env[key], raw, "env")

    values.update(overrides or {})
    settings = Settings(**values, config_file=config_file)
    _validate(settings)
    return settings
